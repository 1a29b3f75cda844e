extension Userfaultfd.Handle {
    /// Atomically copies the bytes of `source` into the registered range at
    /// `destination` and wakes the threads waiting there.
    ///
    /// The length is the buffer's: no pointer arithmetic is left to the caller.
    ///
    /// ```swift
    /// let page = [UInt8](repeating: 0x2A, count: systemPageSize)
    /// let outcome = try page.withUnsafeBytes { bytes in
    ///     try handle.copy(to: fault.address, from: bytes)
    /// }
    /// ```
    ///
    /// - Parameters:
    ///   - destination: The page-aligned first address to fill, in a range registered MISSING.
    ///   - source: A non-empty buffer whose length is a whole number of pages.
    ///   - mode: ``Userfaultfd/CopyMode/dontWake`` and/or ``Userfaultfd/CopyMode/writeProtect``.
    /// - Returns: ``Userfaultfd/Outcome/completed(_:)``, ``Userfaultfd/Outcome/partial(_:)``,
    ///   ``Userfaultfd/Outcome/alreadyPresent`` or ``Userfaultfd/Outcome/retryAfterEvents``.
    /// - Throws: ``UserfaultfdError/Kind/invalidArgument(_:)`` for an empty buffer or one
    ///   that is not a whole number of base pages, else `UserfaultfdError` for `UFFDIO_COPY`.
    ///
    /// The corresponding C call is `ioctl(fd, UFFDIO_COPY, &uffdio_copy)`.
    public func copy(
        to destination: UInt64, from source: UnsafeRawBufferPointer, mode: Userfaultfd.CopyMode = []
    ) throws(UserfaultfdError) -> Userfaultfd.Outcome {
        guard let base = source.baseAddress, source.count % systemPageSize == 0 else {
            throw UserfaultfdError(operation: "UFFDIO_COPY", kind: .invalidArgument(
                "the source holds \(source.count) bytes, not a positive multiple of the page size \(systemPageSize)"))
        }
        return try copy(to: destination, from: base, length: source.count, mode: mode)
    }

    /// Atomically copies the bytes of `source` into the registered range at
    /// `destination` and wakes the threads waiting there.
    ///
    /// ```swift
    /// let page = [UInt8](repeating: 0x2A, count: systemPageSize)
    /// let outcome = try handle.copy(to: fault.address, from: page.span.bytes)
    /// ```
    ///
    /// - Parameters:
    ///   - destination: The page-aligned first address to fill, in a range registered MISSING.
    ///   - source: Non-empty bytes whose length is a whole number of pages.
    ///   - mode: ``Userfaultfd/CopyMode/dontWake`` and/or ``Userfaultfd/CopyMode/writeProtect``.
    /// - Returns: ``Userfaultfd/Outcome/completed(_:)``, ``Userfaultfd/Outcome/partial(_:)``,
    ///   ``Userfaultfd/Outcome/alreadyPresent`` or ``Userfaultfd/Outcome/retryAfterEvents``.
    /// - Throws: ``UserfaultfdError/Kind/invalidArgument(_:)`` for an empty source or one
    ///   that is not a whole number of base pages, else `UserfaultfdError` for `UFFDIO_COPY`.
    ///
    /// The corresponding C call is `ioctl(fd, UFFDIO_COPY, &uffdio_copy)`.
    public func copy(
        to destination: UInt64, from source: RawSpan, mode: Userfaultfd.CopyMode = []
    ) throws(UserfaultfdError) -> Userfaultfd.Outcome {
        try source.withUnsafeBytes { (bytes) throws(UserfaultfdError) in
            try copy(to: destination, from: bytes, mode: mode)
        }
    }
}
