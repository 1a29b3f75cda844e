/// SplitMix64: a small, fast generator whose sequence is fixed by its seed, for touch
/// orders and test data that must be the same in every run. Not for anything secret.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    /// The generator's state; the next value is derived from it.
    public var state: UInt64

    /// A generator that yields the same sequence for the same `seed`.
    ///
    /// - Parameter seed: any value.
    public init(seed: UInt64) { state = seed }

    /// The next value of the sequence.
    ///
    /// - Returns: 64 pseudo-random bits.
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
