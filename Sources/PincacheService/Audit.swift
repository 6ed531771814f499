import Dispatch
import SystemKit
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
/// Where the daemon's log goes to journald (Log.journal), the records go there as fields of
/// their own; elsewhere (a terminal, tests) the same fields go to stderr as one line each.
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
        // @unchecked: `queue`, `started` and `writing` are guarded by `condition`.
        private let condition = ConditionLock()
        private var queue: [Record] = []
        private var started = false
        private var writing = false
        static let capacity = 4096

        func enqueue(_ record: Record) {
            condition.lock()
            if !started {
                started = true
                startThread(name: "pincache-audit") { [self] in run() }
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
            if let journal = Log.journal,
                journal.send(priority: r.ok ? 6 : 4, message: message, fields: [("MESSAGE_ID", r.event.messageID)] + r.fields)
            {
                return
            }
            let line = r.fields.map { "\($0.0)=\(Audit.clean($0.1))" }.joined(separator: " ")
            Log.write(r.ok ? .info : .warning, "audit MESSAGE_ID=\(r.event.messageID) \(line)")
        }

        private func value(_ r: Record, _ key: String) -> String { r.fields.first { $0.0 == key }?.1 ?? "?" }
    }

    static func clean(_ value: String) -> String { Journal.clean(value) }
}
