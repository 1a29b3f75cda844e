import Userfaultfd

/// The pager's state lock, and what fillers wait on for buffer space.
///
/// Only pager threads and the pager's own API calls take it, and none of them touches
/// mapped memory that could fault while holding it.
typealias PagerLock = ConditionLock
