// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "swift-userfaultfd",
    products: [
        .library(name: "Userfaultfd", targets: ["Userfaultfd"]),
        .library(name: "FaultEngine", targets: ["FaultEngine"]),
        .library(name: "Postcopy", targets: ["Postcopy"]),
        .library(name: "FaultManager", targets: ["FaultManager"]),
        .executable(name: "uffd", targets: ["uffd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
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
            dependencies: ["FaultEngine", "_CBenchReference"]
        ),
        // Postcopy live migration of memory between processes and machines.
        .target(
            name: "Postcopy",
            dependencies: [
                "Userfaultfd",
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
                "FaultEngine",
                "FaultManager",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The command-line tool.
        .executableTarget(
            name: "uffd",
            dependencies: [
                "Userfaultfd",
                "FaultEngine",
                "FaultBench",
                "Postcopy",
                "FaultManager",
                "ManagerBench",
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
        // What the test targets share: the process gate every suite carries, fixtures.
        .target(
            name: "TestSupport",
            dependencies: ["Userfaultfd"],
            path: "Tests/TestSupport"
        ),
        .testTarget(
            name: "UserfaultfdTests",
            dependencies: ["Userfaultfd", "_CUserfaultfd", "uffd-test-helper", "TestSupport"]
        ),
        .testTarget(
            name: "FaultEngineTests",
            dependencies: ["FaultEngine", "Userfaultfd", "_CFaultEngine", "TestSupport"]
        ),
        // Runs the Postcopy scenarios whose expected outcome is a signal.
        .executableTarget(
            name: "postcopy-test-helper",
            dependencies: ["Postcopy", "Userfaultfd"]
        ),
        .testTarget(
            name: "PostcopyTests",
            dependencies: ["Postcopy", "Userfaultfd", "postcopy-test-helper", "TestSupport"]
        ),
        .testTarget(
            name: "FaultManagerTests",
            dependencies: [
                "FaultManager",
                "Userfaultfd",
                "FaultEngine",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                "TestSupport",
                "ManagerBench",
            ]
        ),
        .testTarget(
            name: "FaultBenchTests",
            dependencies: ["FaultBench", "Userfaultfd", "TestSupport"]
        ),
    ]
)
