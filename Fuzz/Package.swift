// swift-tools-version: 6.0
import PackageDescription

// libFuzzer targets for pincache's decoders of untrusted bytes (issue 6 item 1).
//
// A package of its own so the main `swift build` stays as it is: scripts/fuzz.sh builds it
// with `-sanitize=fuzzer,address`, which every Swift module here then gets.
// Sources/* are symlinks to the main package's modules, so the fuzzers run exactly the
// shipped code; debug builds are testable, so `@testable import` reaches internal decoders.
func fuzzer(_ name: String, _ dependencies: [Target.Dependency]) -> Target {
    .executableTarget(name: name, dependencies: ["FuzzDriver", "FuzzSupport", "CDBus"] + dependencies, path: "Targets/\(name)")
}

let package = Package(
    name: "pincache-fuzz",
    targets: [
        .systemLibrary(name: "CDBus", pkgConfig: "dbus-1"),
        .systemLibrary(name: "CPKCS11", pkgConfig: "p11-kit-1"),
        .systemLibrary(name: "CPCSC", pkgConfig: "libpcsclite"),
        .target(name: "CShims"),
        .target(name: "SystemKit", dependencies: ["CShims"]),
        .target(name: "DBusKit", dependencies: ["CDBus", "SystemKit", "CShims"]),
        .target(name: "PKCS11Kit", dependencies: ["CPKCS11"]),
        .target(name: "PCSCKit", dependencies: ["CPCSC", "SystemKit"]),
        .target(name: "PinPolicy", dependencies: ["CShims"]),
        .target(name: "CryptokiWire", dependencies: ["CShims"]),
        .target(name: "PincacheService", dependencies: ["DBusKit", "PKCS11Kit", "PCSCKit", "PinPolicy", "CShims", "CryptokiWire", "SystemKit"]),
        .target(name: "CPincacheProxy", dependencies: ["CPKCS11", "CShims"]),
        .target(name: "PincacheProxy", dependencies: ["CPincacheProxy", "CPKCS11", "DBusKit", "CryptokiWire", "CShims"]),

        // libFuzzer's driver for the executables below (see Driver/include/fuzzdriver.h).
        .target(name: "FuzzDriver", path: "Driver"),
        // One executable per fuzz target; Fuzz/corpus/<name>/ holds each one's seeds.
        .target(name: "FuzzSupport", dependencies: ["CDBus"], path: "Support"),
        fuzzer("FuzzDBusMessage", ["DBusKit"]),
        fuzzer("FuzzServiceArguments", ["CryptokiWire", "PKCS11Kit", "PinPolicy", "PincacheService", "CPKCS11"]),
        fuzzer("FuzzConfiguration", ["PinPolicy"]),
        fuzzer("FuzzKeyUsage", ["PinPolicy"]),
        fuzzer("FuzzProxyReply", ["CryptokiWire", "PincacheProxy", "CPKCS11"]),
        fuzzer("FuzzProxyArguments", ["CryptokiWire", "PincacheProxy", "CPKCS11"]),
        fuzzer("FuzzCryptokiWire", ["CryptokiWire"]),
    ],
    swiftLanguageModes: [.v6]
)
