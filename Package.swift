// swift-tools-version: 6.0
import PackageDescription

// The proxy's linker version script, by absolute path: the linker does not run in the
// package directory.
let packageDirectory = String(#filePath.dropLast("/Package.swift".count))

// One target per concern (see README "Layout"). One third-party Swift package,
// swift-argument-parser, for pincachectl only: every dependency is rebuilt on each CI run.
let package = Package(
    name: "pincache",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "pincached", targets: ["pincached"]),
        .executable(name: "pincachectl", targets: ["pincachectl"]),
        // Test support only (never installed): a PKCS#11 module that forwards to another
        // module and injects faults on command (see Sources/FaultShim/README.md).
        .library(name: "pincache-faultshim", type: .dynamic, targets: ["FaultShim"]),
        // The PKCS#11 proxy applications load (DESIGN §4).
        .library(name: "pincache-pkcs11", type: .dynamic, targets: ["PincacheProxyLibrary"]),
    ],
    dependencies: [
        // pincachectl's command line: subcommands, help and usage errors people expect.
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // C libraries.
        .systemLibrary(name: "CDBus", pkgConfig: "dbus-1", providers: [.apt(["libdbus-1-dev"])]),
        .systemLibrary(name: "CPKCS11", pkgConfig: "p11-kit-1", providers: [.apt(["libp11-kit-dev"])]),
        .systemLibrary(name: "CPCSC", pkgConfig: "libpcsclite", providers: [.apt(["libpcsclite-dev"])]),
        // The few libc calls Swift cannot make (variadic prctl, ...).
        .target(name: "CShims"),
        // Threads, a condition variable, whole-file reads, descriptor writes: what the programs
        // took from Foundation, whose ICU made each static binary 45 MB larger.
        .target(name: "SystemKit", dependencies: ["CShims"]),

        // libdbus binding: connections, marshalling, declared interfaces. Knows nothing of PINs.
        .target(name: "DBusKit", dependencies: ["CDBus", "SystemKit", "CShims"]),
        // PKCS#11 module binding: dlopen, typed handles, CK_RV errors.
        .target(name: "PKCS11Kit", dependencies: ["CPKCS11"]),
        // PC/SC binding: a watcher for readers and cards coming and going.
        .target(name: "PCSCKit", dependencies: ["CPCSC", "SystemKit"]),
        // The caching policy core: pure Swift, no D-Bus, no PKCS#11 calls.
        .target(name: "PinPolicy", dependencies: ["CShims"]),
        // The D-Bus service: objects, token workers, glue between the three above.
        .target(name: "PincacheService", dependencies: ["DBusKit", "PKCS11Kit", "PCSCKit", "PinPolicy", "CShims", "CryptokiWire", "SystemKit"]),
        // The proxy's RPC: the one call table, its encoder and decoder, and framing. Pure Swift,
        // shared by the daemon and the proxy.
        .target(name: "CryptokiWire", dependencies: ["CShims"]),
        .executableTarget(name: "pincached", dependencies: [
            "PincacheService", "CryptokiWire", "PKCS11Kit", "SystemKit", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // The command-line front. CDBus only for SignOnce, whose PIN goes from a wiped
        // buffer straight into the message instead of through a Swift String.
        .executableTarget(name: "pincachectl", dependencies: [
            "DBusKit", "CDBus", "SystemKit", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .target(name: "FaultShim", dependencies: ["CPKCS11"]),

        // The PKCS#11 proxy: C function table and fork handling, then the Swift forwarder.
        // The Swift runtime is linked in statically (`ldd` shows no Swift library) and the
        // version script exports C_GetFunctionList alone. `-z nodelete`: hosts dlclose
        // modules without C_Finalize (pkcs11-tool on a fatal error), and the loop thread
        // and the Swift runtime must never find their code unmapped.
        .target(name: "CPincacheProxy", dependencies: ["CPKCS11", "CShims"]),
        .target(name: "PincacheProxy", dependencies: ["CPincacheProxy", "CPKCS11", "DBusKit", "CryptokiWire", "CShims"]),
        // The shared object's link alone: the proxy's code stays a plain target, so
        // ProxyLoopbackTests can drive its entry points in process against the daemon's.
        .target(name: "PincacheProxyLibrary", dependencies: ["PincacheProxy"],
                linkerSettings: [.unsafeFlags([
                    "-static-stdlib",
                    "-Xlinker", "-z", "-Xlinker", "nodelete",
                    "-Xlinker", "--version-script=\(packageDirectory)/Sources/CPincacheProxy/exports.map",
                ])]),

        .testTarget(name: "PinPolicyTests", dependencies: ["PinPolicy"]),
        .testTarget(name: "DBusKitTests", dependencies: ["DBusKit"]),
        .testTarget(name: "PKCS11KitTests", dependencies: ["PKCS11Kit"]),
        .testTarget(name: "PincacheServiceTests", dependencies: ["PincacheService"]),
        .testTarget(name: "CryptokiWireTests", dependencies: ["CryptokiWire"]),
        .testTarget(name: "ProxyLoopbackTests", dependencies: [
            "PincacheProxy", "CPincacheProxy", "PincacheService", "PinPolicy", "DBusKit", "CPKCS11", "CryptokiWire",
        ]),
    ],
    swiftLanguageModes: [.v6]
)
