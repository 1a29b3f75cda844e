// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "swift-userfaultfd",
    products: [
        .library(name: "Userfaultfd", targets: ["Userfaultfd"]),
        .library(name: "UserfaultfdDiagnostics", targets: ["UserfaultfdDiagnostics"]),
        .library(name: "FaultEngine", targets: ["FaultEngine"]),
        .library(name: "Postcopy", targets: ["Postcopy"]),
        .library(name: "FaultManager", targets: ["FaultManager"]),
        .library(name: "Snapshot", targets: ["Snapshot"]),
        .library(name: "PagedMemory", targets: ["PagedMemory"]),
        .executable(name: "uffd", targets: ["uffd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        // `swift package generate-documentation` (Scripts/docs.sh); no target depends on it.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // C shim: kernel constants, structs and non-variadic ioctl/syscall wrappers. No logic.
        .target(
            name: "_CUserfaultfd",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // Typed API over one userfaultfd.
        .target(
            name: "Userfaultfd",
            dependencies: [
                "_CUserfaultfd",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // What the machine offers (`uffd probe`) and huge-page administration, above the typed API.
        .target(
            name: "UserfaultfdDiagnostics",
            dependencies: [
                "Userfaultfd",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // C whose job is to be C: the async-signal-safe SIGBUS resolver of the engine.
        .target(
            name: "_CFaultEngine",
            dependencies: ["_CUserfaultfd"],
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // Serving faults: handler threads, page sources, strategies, prefetch, statistics.
        .target(
            name: "FaultEngine",
            dependencies: [
                "Userfaultfd",
                "_CFaultEngine",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        // The yardsticks `uffd bench` compares against: a C reference handler and the SIGSEGV scheme.
        .target(
            name: "_CBenchReference",
            dependencies: ["_CUserfaultfd"],
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // `uffd bench`: every contender interleaved in one run, verified byte for byte.
        .target(
            name: "FaultBench",
            dependencies: ["FaultEngine", "_CBenchReference", "FaultTrace"]
        ),
        // Postcopy live migration of memory between processes and machines.
        .target(
            name: "Postcopy",
            dependencies: [
                "Userfaultfd",
                "FaultEngine",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        // The non-cooperative manager daemon behind `uffd serve`.
        .target(
            name: "FaultManager",
            dependencies: [
                "Userfaultfd",
                "FaultEngine",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // `uffd serve-bench`: the manager daemon measured against baselines of the same run.
        .target(
            name: "ManagerBench",
            dependencies: [
                "Userfaultfd",
                "UserfaultfdDiagnostics",
                "FaultEngine",
                "FaultManager",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // `uffd trace`: which pages a workload touches, recorded to a file and drawn as a page.
        .target(
            name: "FaultTrace",
            dependencies: [
                "FaultEngine",
                "Userfaultfd",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // C whose job is to be C: the CRC32C instruction the snapshot format checksums with,
        // and copy before write in the writing threads' SIGBUS handler.
        .target(
            name: "_CSnapshot",
            dependencies: ["_CUserfaultfd"],
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // Live snapshots of this process's memory: capture, file format, restore.
        .target(
            name: "Snapshot",
            dependencies: [
                "Userfaultfd",
                "FaultEngine",
                "_CSnapshot",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        // Open flags that need _GNU_SOURCE (O_DIRECT, O_TMPFILE). No logic.
        .target(
            name: "_CPagedMemory",
            dependencies: ["_CUserfaultfd"],
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // Data larger than memory: a bounded page buffer over a store, with eviction and write-back.
        .target(
            name: "PagedMemory",
            dependencies: [
                "Userfaultfd",
                "_CPagedMemory",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // `uffd map bench`: out-of-core workloads over the kernel's mmap and PagedMemory in a memory cgroup.
        .target(
            name: "MapBench",
            dependencies: ["PagedMemory", "Userfaultfd", "FaultEngine"]
        ),
        // The command-line tool.
        .executableTarget(
            name: "uffd",
            dependencies: [
                "Userfaultfd",
                "UserfaultfdDiagnostics",
                "FaultEngine",
                "FaultBench",
                "Postcopy",
                "FaultManager",
                "ManagerBench",
                "FaultTrace",
                "Snapshot",
                "PagedMemory",
                "MapBench",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // A guest-like client of `uffd serve`, for its tests and benchmarks.
        .executableTarget(
            name: "uffd-test-client",
            dependencies: [
                "Userfaultfd",
                "FaultManager",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // A process of its own for the Userfaultfd tests (for example, one without privileges).
        .executableTarget(
            name: "uffd-test-helper",
            dependencies: ["Userfaultfd"]
        ),
        // libFuzzer targets for peer input (Scripts/fuzz.sh builds them with -sanitize=fuzzer).
        .executableTarget(
            name: "uffd-fuzz",
            dependencies: ["FaultManager", "Userfaultfd", "Postcopy"]
        ),
        // What the test targets share: the process gate every suite carries, fixtures.
        .target(
            name: "TestSupport",
            dependencies: ["Userfaultfd", "UserfaultfdDiagnostics"],
            path: "Tests/TestSupport"
        ),
        .testTarget(
            name: "UserfaultfdTests",
            dependencies: ["Userfaultfd", "UserfaultfdDiagnostics", "_CUserfaultfd", "uffd-test-helper", "TestSupport"]
        ),
        .testTarget(
            name: "FaultEngineTests",
            dependencies: ["FaultEngine", "Userfaultfd", "UserfaultfdDiagnostics", "_CFaultEngine", "TestSupport"]
        ),
        // Runs the Postcopy scenarios whose expected outcome is a signal.
        .executableTarget(
            name: "postcopy-test-helper",
            dependencies: ["Postcopy", "Userfaultfd"]
        ),
        .testTarget(
            name: "PostcopyTests",
            dependencies: ["Postcopy", "Userfaultfd", "postcopy-test-helper", "uffd", "TestSupport"]
        ),
        .testTarget(
            name: "FaultManagerTests",
            dependencies: [
                "FaultManager",
                "Userfaultfd",
                "UserfaultfdDiagnostics",
                "FaultEngine",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                "TestSupport",
                "ManagerBench",
            ]
        ),
        // Holds every swift example of the documentation, so that each one compiles.
        .testTarget(
            name: "DocumentationTests",
            dependencies: [
                "Userfaultfd",
                "UserfaultfdDiagnostics",
                "FaultEngine",
                "Postcopy",
                "FaultManager",
                "PagedMemory",
                "Snapshot",
                "FaultTrace",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                "TestSupport",
            ]
        ),
        // A process of its own for the PagedMemory tests whose outcome is a signal or an exit.
        .executableTarget(
            name: "paged-memory-test-helper",
            dependencies: ["PagedMemory", "MapBench", "FaultEngine"]
        ),
        .testTarget(
            name: "PagedMemoryTests",
            dependencies: ["PagedMemory", "MapBench", "Userfaultfd", "FaultEngine", "paged-memory-test-helper", "TestSupport"]
        ),
        .testTarget(
            name: "FaultTraceTests",
            dependencies: ["FaultTrace", "FaultEngine", "Userfaultfd", "TestSupport"]
        ),
        .testTarget(
            name: "FaultBenchTests",
            dependencies: ["FaultBench", "Userfaultfd", "TestSupport"]
        ),
        .testTarget(
            name: "SnapshotTests",
            dependencies: ["Snapshot", "Userfaultfd", "FaultEngine", "TestSupport"]
        ),
    ]
)
