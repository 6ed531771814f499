import Glibc
import PKCS11Kit

/// Issue 12 §7: one structured record per PIN submission, per private-key operation and per
/// flush, for both front ends. Each kind has its own MESSAGE_ID (`journalctl MESSAGE_ID=…`)
/// and the fields below; never a PIN, never the data signed or decrypted.
///
/// | field | |
/// |---|---|
/// | `PINCACHE_EVENT` | `pin-submission`, `key-operation`, `flush` |
/// | `PINCACHE_UID`, `PINCACHE_PID`, `PINCACHE_EXE` | the caller |
/// | `PINCACHE_TOKEN`, `PINCACHE_TOKEN_SERIAL`, `PINCACHE_TOKEN_LABEL` | the token |
/// | `PINCACHE_OPERATION` | `login`, `so-login`, `sign`, `sign-with-pin`, `decrypt`, … |
/// | `PINCACHE_KEY_ID`, `PINCACHE_MECHANISM` | key operations (hex id, mechanism number) |
/// | `PINCACHE_PIN` | how the operation was authenticated: `cached`, `fresh`, `held-login`, `none` |
/// | `PINCACHE_RESULT` | `ok`, or the CK_RV name (`CKR_PIN_INCORRECT`, …) or D-Bus error |
/// | `PINCACHE_COUNT` | flush: cached PINs wiped |
///
/// Where journald listens (`/run/systemd/journal/socket`) the records go there in its native
/// protocol; elsewhere (tests, a private bus, no systemd) the same fields go to stderr as one
/// `pincached[audit]:` line each.
enum Audit {
    enum Event: String {
        case pinSubmission = "pin-submission"
        case keyOperation = "key-operation"
        case flush

        var messageID: String {
            switch self {
            case .pinSubmission: "5f2c3e0a9b8d4c61a7e2f4d8c1b09a31"
            case .keyOperation: "8a41d7c2e05b4f9c93d6a1e7b2c4f062"
            case .flush: "c7e9b3a1d2f04e58b6a9c0d1e2f3a4b5"
            }
        }
    }

    static let journalSocket = "/run/systemd/journal/socket"
    /// Set by tests and the private bus: records go to stderr even where journald listens.
    nonisolated(unsafe) static var forceStderr = false

    static func record(
        _ event: Event, caller: CallerInfo?, token: TokenContext?, operation: String, result: String,
        extra: [(String, String)] = []
    ) {
        var fields: [(String, String)] = [
            ("PINCACHE_EVENT", event.rawValue),
            ("PINCACHE_UID", caller?.uid.map(String.init) ?? "?"),
            ("PINCACHE_PID", caller?.pid.map(String.init) ?? "?"),
            ("PINCACHE_EXE", caller?.executable ?? "?"),
        ]
        if let token {
            let info = token.snapshot.info
            fields += [
                ("PINCACHE_TOKEN", token.id), ("PINCACHE_TOKEN_SERIAL", info?.serialNumber ?? ""),
                ("PINCACHE_TOKEN_LABEL", info?.label ?? ""),
            ]
        }
        fields.append(("PINCACHE_OPERATION", operation))
        fields += extra
        fields.append(("PINCACHE_RESULT", result))
        let ok = result == "ok"
        let message =
            "\(event.rawValue) \(operation) by uid \(caller?.uid.map(String.init) ?? "?") (\(caller?.executable ?? "?"))"
            + (token.map { " on token \($0.id)" } ?? "") + ": \(result)"
        if !forceStderr, sendToJournal(fields, event: event, message: message, priority: ok ? 6 : 4) { return }
        let line = fields.map { "\($0.0)=\(clean($0.1))" }.joined(separator: " ")
        Log.write(ok ? .info : .warning, "audit MESSAGE_ID=\(event.messageID) \(line)")
    }

    /// Result text for a failed job.
    static func result(of error: any Error) -> String {
        switch error {
        case let e as PKCS11Error: return e.rv.name
        case let e as ServiceError: return ReturnValue(rawValue: e.rv).name
        default: return "error"
        }
    }

    private static func clean(_ value: String) -> String {
        String(value.map { $0 == "\n" || $0 == "\r" ? " " : $0 }.prefix(512))
    }

    /// journald's native protocol: `KEY=value` lines in one datagram (values cleaned of
    /// newlines, so no binary form is needed). False if there is no journal to talk to.
    private static func sendToJournal(_ fields: [(String, String)], event: Event, message: String, priority: Int) -> Bool {
        var text = "MESSAGE_ID=\(event.messageID)\nPRIORITY=\(priority)\nSYSLOG_IDENTIFIER=pincached\nMESSAGE=\(clean(message))\n"
        for (k, v) in fields { text += "\(k)=\(clean(v))\n" }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = Array(journalSocket.utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.enumerated() where i < raw.count - 1 { raw[i] = b }
        }
        let sent = text.utf8CString.withUnsafeBufferPointer { buffer in
            withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, buffer.baseAddress, buffer.count - 1, Int32(MSG_NOSIGNAL), $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
        }
        return sent >= 0
    }
}
