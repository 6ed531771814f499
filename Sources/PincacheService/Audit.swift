import Foundation
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
        writer.enqueue(Record(event: event, fields: fields, ok: result == "ok"))
    }

    /// Result text for a failed job.
    static func result(of error: any Error) -> String {
        switch error {
        case let e as PKCS11Error: return e.rv.name
        case let e as ServiceError: return ReturnValue(rawValue: e.rv).name
        default: return "error"
        }
    }

    static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    struct Record: Sendable {
        let event: Event
        let fields: [(String, String)]
        let ok: Bool
    }

    /// Records are formatted and written by a thread of their own: a signature does not wait
    /// for a write(2) to the journal. The queue is bounded; a full queue makes the recording
    /// thread wait (nothing is dropped).
    static let writer = Writer()

    final class Writer: @unchecked Sendable {
        // @unchecked: `queue` is guarded by `condition`; `journal` belongs to the thread.
        private let condition = NSCondition()
        private var queue: [Record] = []
        private var started = false
        private var writing = false
        private var journal: Int32 = -1
        static let capacity = 4096

        func enqueue(_ record: Record) {
            condition.lock()
            if !started {
                started = true
                let thread = Thread { [self] in run() }
                thread.name = "pincache-audit"
                thread.start()
            }
            while queue.count >= Self.capacity { condition.wait() }
            queue.append(record)
            condition.broadcast()
            condition.unlock()
        }

        /// Waits until every record queued so far is written (tests, shutdown).
        func drain() {
            condition.lock()
            while !queue.isEmpty || writing { condition.wait() }
            condition.unlock()
        }

        private func run() {
            while true {
                condition.lock()
                while queue.isEmpty { condition.wait() }
                let batch = queue
                queue.removeAll(keepingCapacity: true)
                writing = true
                condition.broadcast()
                condition.unlock()
                for record in batch { write(record) }
                condition.lock()
                writing = false
                condition.broadcast()
                condition.unlock()
            }
        }

        private func write(_ r: Record) {
            let message =
                "\(r.event.rawValue) \(value(r, "PINCACHE_OPERATION")) by uid \(value(r, "PINCACHE_UID")) (\(value(r, "PINCACHE_EXE")))"
                + (r.fields.contains { $0.0 == "PINCACHE_TOKEN" } ? " on token \(value(r, "PINCACHE_TOKEN"))" : "")
                + ": \(value(r, "PINCACHE_RESULT"))"
            if !Audit.forceStderr, sendToJournal(r, message: message) { return }
            let line = r.fields.map { "\($0.0)=\(Audit.clean($0.1))" }.joined(separator: " ")
            Log.write(r.ok ? .info : .warning, "audit MESSAGE_ID=\(r.event.messageID) \(line)")
        }

        private func value(_ r: Record, _ key: String) -> String { r.fields.first { $0.0 == key }?.1 ?? "?" }

        /// journald's native protocol: `KEY=value` lines in one datagram (values cleaned of
        /// newlines, so no binary form is needed). False if there is no journal to talk to.
        private func sendToJournal(_ r: Record, message: String) -> Bool {
            var text =
                "MESSAGE_ID=\(r.event.messageID)\nPRIORITY=\(r.ok ? 6 : 4)\nSYSLOG_IDENTIFIER=pincached\nMESSAGE=\(Audit.clean(message))\n"
            for (k, v) in r.fields { text += "\(k)=\(Audit.clean(v))\n" }
            if journal < 0 {
                journal = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
                guard journal >= 0 else { return false }
            }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let path = Array(Audit.journalSocket.utf8)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                for (i, b) in path.enumerated() where i < raw.count - 1 { raw[i] = b }
            }
            let sent = text.utf8CString.withUnsafeBufferPointer { buffer in
                withUnsafePointer(to: &address) { pointer in
                    pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(journal, buffer.baseAddress, buffer.count - 1, Int32(MSG_NOSIGNAL), $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                    }
                }
            }
            return sent >= 0
        }
    }

    static func clean(_ value: String) -> String {
        guard value.utf8.contains(where: { $0 == 10 || $0 == 13 }) || value.utf8.count > 512 else { return value }
        return String(value.map { $0 == "\n" || $0 == "\r" ? " " : $0 }.prefix(512))
    }
}
