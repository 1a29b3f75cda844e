// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "swift-userfaultfd",
    products: [
        .library(name: "Userfaultfd", targets: ["Userfaultfd"]),
        .executable(name: "uffd", targets: ["uffd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
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
        // The command-line tool.
        .executableTarget(
            name: "uffd",
            dependencies: [
                "Userfaultfd",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "UserfaultfdTests",
            dependencies: ["Userfaultfd", "_CUserfaultfd"]
        ),
    ]
)
