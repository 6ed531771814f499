import Foundation
import PKCS11Kit
import Testing

/// One SoftHSM token in a temporary directory, reached through a freshly compiled
/// FaultShim. SoftHSM can be initialised only once per process, so every test shares
/// this one module (the shim is a pure pass-through until a control file appears).
struct Fixture: Sendable {
    static let softHSM = "/usr/lib/softhsm/libsofthsm2.so"
    static let userPIN = "1234"
    static let soPIN = "5678"

    /// Built on first use; a missing tool or module fails every test that needs it.
    static let shared: Result<Fixture, any Error> = Result { try Fixture() }
    static func get() throws -> Fixture { try shared.get() }

    let directory: URL
    let controlDirectory: URL
    let module: PKCS11Module
    /// The slot holding token "T" with keys `ec` (CKA_ID 01) and `rsa` (CKA_ID 02).
    let slot: SlotID
    /// SoftHSM's spare slot, uninitialised when the fixture was built. `initTokenAndPINs`
    /// initialises it, and SoftHSM adds no new spare until it is loaded again.
    let spareSlot: SlotID

    private init() throws {
        let fm = FileManager.default
        directory = fm.temporaryDirectory.appendingPathComponent("pkcs11kit-tests-\(getpid())-\(UUID().uuidString)")
        controlDirectory = directory.appendingPathComponent("control")
        let tokens = directory.appendingPathComponent("tokens")
        try fm.createDirectory(at: tokens, withIntermediateDirectories: true)
        try fm.createDirectory(at: controlDirectory, withIntermediateDirectories: true)

        let conf = directory.appendingPathComponent("softhsm2.conf")
        try """
        directories.tokendir = \(tokens.path)
        objectstore.backend = file
        log.level = ERROR
        slots.removable = false

        """.write(to: conf, atomically: true, encoding: .utf8)
        // Must be set before SoftHSM is loaded, here and in the tool subprocesses.
        setenv("SOFTHSM2_CONF", conf.path, 1)

        try run("softhsm2-util", ["--init-token", "--free", "--label", "T", "--pin", Self.userPIN, "--so-pin", Self.soPIN])
        let tool = ["--module", Self.softHSM, "--login", "--pin", Self.userPIN, "--keypairgen"]
        try run("pkcs11-tool", tool + ["--key-type", "EC:prime256v1", "--id", "01", "--label", "ec"])
        try run("pkcs11-tool", tool + ["--key-type", "rsa:2048", "--id", "02", "--label", "rsa"])

        let shim = directory.appendingPathComponent("libfaultshim.so")
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../Sources/FaultShim").standardized
        try run("cc", [
            "-Wall", "-Werror", "-shared", "-fPIC", "-I/usr/include/p11-kit-1",
            "-I\(source.appendingPathComponent("include").path)", source.appendingPathComponent("faultshim.c").path,
            source.appendingPathComponent("optional.c").path, "-lpthread", "-o", shim.path,
        ])
        setenv("PINCACHE_FAULTSHIM_TARGET", Self.softHSM, 1)
        setenv("PINCACHE_FAULTSHIM_DIR", controlDirectory.path, 1)

        let module = try PKCS11Module(path: shim.path)
        self.module = module
        guard let slot = try module.slotList(tokenPresent: true).first(where: { try module.tokenInfo($0).label == "T" })
        else { throw FixtureError("token T not found") }
        self.slot = slot
        guard let spare = try module.slotList(tokenPresent: true).first(where: {
            let info = try module.tokenInfo($0)
            return !info.tokenInitialized && info.label.isEmpty
        }) else { throw FixtureError("no uninitialised spare token") }
        self.spareSlot = spare
    }

    /// Writes (or with nil removes) a FaultShim control file.
    func setControl(_ name: String, _ content: String?) throws {
        let url = controlDirectory.appendingPathComponent(name)
        if let content {
            try content.write(to: url, atomically: true, encoding: .utf8)
        } else if FileManager.default.fileExists(atPath: url.path) {
            try FileManager.default.removeItem(at: url)
        }
    }

    func loginLog() throws -> [String] {
        let url = controlDirectory.appendingPathComponent("logins.log")
        guard FileManager.default.fileExists(atPath: url.path) else { return [] }
        return try String(contentsOf: url, encoding: .utf8).split(separator: "\n").map(String.init)
    }

    /// Opens a session, logs the user in, runs `body`, then logs out and closes.
    func withUserSession<R>(_ body: (SessionHandle) throws -> R) throws -> R {
        let s = try module.openSession(slot)
        defer { try? module.closeSession(s) }
        try login(s)
        defer { try? module.logout(s) }
        return try body(s)
    }

    func login(_ s: SessionHandle, pin: String = Fixture.userPIN, userType: UserType = .user) throws {
        let bytes = Array(pin.utf8)
        try bytes.withUnsafeBytes { try module.login(s, userType: userType, pin: $0) }
    }

    /// The single object of `objectClass` with `CKA_ID` = `id`.
    func object(_ s: SessionHandle, _ objectClass: ObjectClass, id: UInt8) throws -> ObjectHandle {
        let found = try module.findObjects(s, matching: [.objectClass(objectClass), Attribute(.id, [id])])
        return try #require(found.count == 1 ? found.first : nil, "\(objectClass) with id \(id): \(found)")
    }
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Runs a tool found on PATH; a failure carries its output.
func run(_ tool: String, _ arguments: [String]) throws {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = [tool] + arguments
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    try p.run()
    let output = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    guard p.terminationStatus == 0 else {
        throw FixtureError("\(tool) \(arguments.joined(separator: " ")) failed (\(p.terminationStatus)): "
            + String(decoding: output, as: UTF8.self))
    }
}
