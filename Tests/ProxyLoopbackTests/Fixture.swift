import CPKCS11
import CPincacheProxy
import DBusKit
import Foundation
import Glibc
import PinPolicy
import Synchronization
import Testing

@testable import PincacheProxy
@testable import PincacheService

/// The daemon and the proxy in this one process, as p11-kit tests its RPC: a private
/// dbus-daemon (the proxy still asks the bus for its socket), a PincacheService serving a
/// fresh SoftHSM demo token, and the proxy's own CK_FUNCTION_LIST. Every call goes through
/// the proxy's entry points, its wire client, a socket pair held by `Relay` (which can break
/// frames on purpose), the daemon's socket thread and its dispatcher.
///
/// SoftHSM can be initialised once per process and reads SOFTHSM2_CONF when it is, so these
/// tests run in a process of their own: scripts/test.sh runs them with
/// `swift test --filter ProxyLoopbackTests` and PINCACHE_LOOPBACK_TESTS=1, and skips them in
/// the run of every other suite.
final class Loopback: @unchecked Sendable {
    // @unchecked: everything is set once in init; the service and relay are thread-safe.
    static let enabled = ProcessInfo.processInfo.environment["PINCACHE_LOOPBACK_TESTS"] == "1"
    static let shared: Result<Loopback, any Error> = Result { try Loopback() }
    static func get() throws -> Loopback { try shared.get() }

    static let pin = "123456"
    static let tokenLabel = "loopback"

    let directory: URL
    let busProcess: Process
    let connection: DBusConnection
    let service: PincacheService
    let relay = Relay()
    let functions: CK_FUNCTION_LIST

    private init() throws {
        let fm = FileManager.default
        directory = fm.temporaryDirectory.appendingPathComponent("pincache-loopback-\(getpid())")
        try? fm.removeItem(at: directory)
        try fm.createDirectory(at: directory, withIntermediateDirectories: true)
        let scripts = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../scripts").standardized
        try Self.run(
            scripts.appendingPathComponent("make-demo-token.sh").path, [directory.appendingPathComponent("softhsm").path, Self.tokenLabel],
            environment: ["PINCACHE_DEMO_PIN": Self.pin])
        setenv("SOFTHSM2_CONF", directory.appendingPathComponent("softhsm/softhsm2.conf").path, 1)

        let (process, address) = try Self.startBus(in: directory)
        busProcess = process
        // The bus must not outlive the test process (nothing of the tests may stay listening).
        loopbackBusPID = process.processIdentifier
        loopbackDirectory = strdup(directory.path)
        atexit {
            if loopbackBusPID > 0 { kill(loopbackBusPID, SIGKILL) }
            if let dir = loopbackDirectory {
                try? FileManager.default.removeItem(atPath: String(cString: dir))
            }
        }
        setenv("PINCACHE_BUS_ADDRESS", address, 1)

        connection = try DBusConnection(bus: .address(address))
        service = PincacheService(connection: connection, configuration: try Self.configuration(caching: false), onSystemBus: false)
        connection.startLoopThread()
        try service.start(modules: ["/usr/lib/softhsm/libsofthsm2.so"])

        let relay = self.relay
        Library.interposeSocket = { fd in relay.attach(daemon: fd) }
        var list: UnsafeMutableRawPointer?
        guard pincache_get_function_list(&list) == CKR_OK, let list else { throw LoopbackError("no function list") }
        functions = list.assumingMemoryBound(to: CK_FUNCTION_LIST.self).pointee
    }

    static func configuration(caching: Bool) throws -> Configuration {
        try Configuration.parse(
            """
            P11_EnableCachePIN=\(caching ? 1 : 0)
            P11_LogoutAfterSign=0
            ForceLoginBeforeSignKeyUsage=0
            Module=/usr/lib/softhsm/libsofthsm2.so

            """, file: "loopback.cfg")
    }

    private static func startBus(in directory: URL) throws -> (Process, String) {
        let config = directory.appendingPathComponent("bus.conf")
        try """
        <!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
         "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
        <busconfig>
          <type>session</type>
          <listen>unix:dir=\(directory.path)</listen>
          <auth>EXTERNAL</auth>
          <policy context="default">
            <allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/>
          </policy>
        </busconfig>
        """.write(to: config, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/dbus-daemon")
        process.arguments = ["--config-file=\(config.path)", "--nofork", "--print-address=1"]
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        var line = Data()
        while !line.contains(UInt8(ascii: "\n")) {
            let chunk = output.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        let address = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard !address.isEmpty else { throw LoopbackError("dbus-daemon printed no address") }
        return (process, address)
    }

    private static func run(_ tool: String, _ arguments: [String], environment: [String: String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = arguments
        p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw LoopbackError("\(tool) failed (\(p.terminationStatus))") }
    }
}

nonisolated(unsafe) private var loopbackBusPID: pid_t = 0
nonisolated(unsafe) private var loopbackDirectory: UnsafeMutablePointer<CChar>?

struct LoopbackError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Sits between the proxy and the daemon's socket and passes frames on, until a test arms a
/// fault for the next reply (or request). Each link the proxy opens gets a new pair.
final class Relay: @unchecked Sendable {
    // @unchecked: `fault` is atomic; each pump's buffers belong to its thread.
    enum Fault: Int {
        case none
        /// The reply's header says fewer bytes than its fields need (and they are all sent).
        case shortFrame
        /// The reply answers another call than the one asked.
        case wrongCallID
        /// The reply's header claims a body over the protocol's cap.
        case oversizeLength
        /// The daemon's end vanishes with the request unanswered.
        case peerGone
    }
    private let fault = Atomic<Int>(Fault.none.rawValue)
    /// Frames from the daemon seen so far (Hello's included).
    let replies = Atomic<Int>(0)

    func arm(_ f: Fault) { fault.store(f.rawValue, ordering: .sequentiallyConsistent) }

    /// Takes the daemon's end, returns the proxy's end of a new pair.
    func attach(daemon: Int32) -> Int32 {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else { return daemon }
        let proxy = pair[0]
        let mine = pair[1]
        let thread = Thread { self.pump(proxy: mine, daemon: daemon) }
        thread.start()
        return proxy
    }

    private func pump(proxy: Int32, daemon: Int32) {
        defer {
            close(proxy)
            close(daemon)
        }
        var fromDaemon: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            var fds = [pollfd(fd: proxy, events: Int16(POLLIN), revents: 0), pollfd(fd: daemon, events: Int16(POLLIN), revents: 0)]
            guard poll(&fds, 2, -1) > 0 else { continue }
            if fds[0].revents != 0 {
                let n = read(proxy, &buffer, buffer.count)
                if n <= 0 { return }
                if fault.load(ordering: .sequentiallyConsistent) == Fault.peerGone.rawValue {
                    fault.store(Fault.none.rawValue, ordering: .sequentiallyConsistent)
                    return
                }
                guard writeAll(daemon, Array(buffer[0..<n])) else { return }
            }
            if fds[1].revents != 0 {
                let n = read(daemon, &buffer, buffer.count)
                if n <= 0 { return }
                fromDaemon += buffer[0..<n]
                while fromDaemon.count >= 12 {
                    let body = Int(UInt32(fromDaemon[0]) | UInt32(fromDaemon[1]) << 8 | UInt32(fromDaemon[2]) << 16 | UInt32(fromDaemon[3]) << 24)
                    guard fromDaemon.count >= 12 + body else { break }
                    var frame = Array(fromDaemon[0..<(12 + body)])
                    fromDaemon.removeFirst(12 + body)
                    replies.add(1, ordering: .sequentiallyConsistent)
                    let f = Fault(rawValue: fault.exchange(Fault.none.rawValue, ordering: .sequentiallyConsistent)) ?? .none
                    switch f {
                    case .none, .peerGone: break
                    case .shortFrame: setLength(&frame, UInt32(max(0, body - 1)))
                    case .wrongCallID: frame[8] ^= 0x7f
                    case .oversizeLength: setLength(&frame, 0x7fff_fff0)
                    }
                    guard writeAll(proxy, frame) else { return }
                }
            }
        }
    }

    private func setLength(_ frame: inout [UInt8], _ length: UInt32) {
        for i in 0..<4 { frame[i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i))) }
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            offset += n
        }
        return true
    }
}
