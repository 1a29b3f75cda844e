import Userfaultfd

/// The lock of a capture's fault handler and image writer, and what they wait on
/// (threads of this module only: the caller's writers never take it).
typealias Monitor = ConditionLock

