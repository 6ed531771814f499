import CPCSC
import Glibc
import SystemKit
import Synchronization

/// Watches PC/SC (pcscd) for card insertion and removal and for readers coming and going,
/// on a thread of its own (SCardGetStatusChange blocks). It says which reader gained or lost
/// a card (`onCard`, at once: the daemon can announce it before any module has probed the
/// card, which for a card OpenSC does not know takes seconds), and that something changed
/// (`onChange`: the daemon then rescans its PKCS#11 modules, which know what it means).
/// pcscd absent at start, killed or restarted is survived: the watcher logs once per outage,
/// retries, and reports a change when pcscd is back (everything may have moved meanwhile).
public final class ReaderWatcher: Sendable {
    /// The pseudo-reader whose state changes when readers are added or removed.
    private static let pnpReader = "\\\\?PnP?\\Notification"
    private static let retryInterval: Double = 2
    // pcsclite's error values; its macros are casts Swift does not import.
    private static let success = 0
    private static let timeout = 0x8010_000A
    private static let cancelled = 0x8010_0002
    private static let noReadersAvailable = 0x8010_002E
    private static let unknownReader = 0x8010_0009

    private struct State {
        var context: SCARDCONTEXT = 0
        var stopping = false
        var connected = false
    }
    private let state = Mutex(State())
    private let onChange: @Sendable () -> Void
    private let onCard: @Sendable (String, Bool) -> Void
    private let log: @Sendable (String) -> Void

    /// - Parameters:
    ///   - onCard: called on the watcher thread when a known reader's card comes (true) or
    ///     goes (false), before `onChange`.
    ///   - onChange: called on the watcher thread after any reader or card change.
    ///   - log: one line per noteworthy event (outage, recovery); never per card event.
    public init(
        onCard: @escaping @Sendable (String, Bool) -> Void = { _, _ in }, onChange: @escaping @Sendable () -> Void,
        log: @escaping @Sendable (String) -> Void
    ) {
        self.onCard = onCard
        self.onChange = onChange
        self.log = log
    }

    /// pcscd answers and every reader's state is known: card changes arrive as events, so
    /// nobody needs to poll the cards.
    public var isConnected: Bool { state.withLock { $0.connected } }

    public func start() {
        startThread(name: "pincache-pcsc") { [self] in run() }
    }

    /// Ends the watcher: SCardCancel wakes a blocked SCardGetStatusChange.
    public func stop() {
        let context = state.withLock { s -> SCARDCONTEXT in
            s.stopping = true
            return s.context
        }
        if context != 0 { SCardCancel(context) }
    }

    private var stopping: Bool { state.withLock { $0.stopping } }

    private func run() {
        var outage = false
        while !stopping {
            var context: SCARDCONTEXT = 0
            let rv = Int(SCardEstablishContext(DWORD(SCARD_SCOPE_SYSTEM), nil, nil, &context))
            guard rv == Self.success else {
                if !outage {
                    log("PC/SC unavailable (\(Self.describe(rv))); smart-card events will resume when pcscd is back")
                    outage = true
                }
                sleep(seconds: Self.retryInterval)
                continue
            }
            state.withLock { $0.context = context }
            if outage {
                log("PC/SC is back")
                outage = false
                onChange()
            }
            let end = watch(context)
            state.withLock {
                $0.context = 0
                $0.connected = false
            }
            SCardReleaseContext(context)
            if stopping { return }
            log("PC/SC connection lost (\(Self.describe(end))); retrying")
            outage = true
            // pcscd going away can mean every reader went with it.
            onChange()
            sleep(seconds: Self.retryInterval)
        }
    }

    /// Blocks in SCardGetStatusChange until the context breaks; returns the error that ended it.
    private func watch(_ context: SCARDCONTEXT) -> Int {
        var known: [String: DWORD] = [:]
        var pnpState: DWORD = DWORD(SCARD_STATE_UNAWARE)
        while !stopping {
            let readers = listReaders(context)
            guard let readers else { return Self.noReadersAvailable }
            // Readers that went away: reported through the PnP change already.
            known = known.filter { readers.contains($0.key) }
            let names = [Self.pnpReader] + readers
            let rv: Int = withCStrings(names) { cNames in
                var states = cNames.enumerated().map { i, name -> SCARD_READERSTATE in
                    var s = SCARD_READERSTATE()
                    s.szReader = UnsafePointer(name)
                    s.dwCurrentState = i == 0 ? pnpState : (known[names[i]] ?? DWORD(SCARD_STATE_UNAWARE))
                    return s
                }
                let rv = Int(SCardGetStatusChange(context, DWORD(INFINITE), &states, DWORD(states.count)))
                if rv == Self.success {
                    var changed = false
                    var cards: [(String, Bool)] = []
                    let present = DWORD(SCARD_STATE_PRESENT)
                    for (i, s) in states.enumerated() {
                        let event = s.dwEventState & ~DWORD(SCARD_STATE_CHANGED)
                        if s.dwEventState & DWORD(SCARD_STATE_CHANGED) != 0 {
                            // The first sight of a reader is not a change; later flips are.
                            if i == 0 || known[names[i]] != nil { changed = true }
                            if i > 0, let before = known[names[i]], (before & present) != (event & present) {
                                cards.append((names[i], event & present != 0))
                            }
                        }
                        if i == 0 { pnpState = event } else { known[names[i]] = event }
                    }
                    self.state.withLock { $0.connected = true }
                    for (reader, inserted) in cards { onCard(reader, inserted) }
                    if changed { onChange() }
                }
                return rv
            }
            switch rv {
            case Self.success, Self.timeout, Self.unknownReader:
                continue  // a reader vanished between list and wait: list again
            case Self.cancelled where stopping:
                return rv
            default:
                return rv
            }
        }
        return Self.cancelled
    }

    /// Reader names, [] when there are none; nil when the context is broken.
    private func listReaders(_ context: SCARDCONTEXT) -> [String]? {
        var length: DWORD = 0
        var rv = Int(SCardListReaders(context, nil, nil, &length))
        if rv == Self.noReadersAvailable { return [] }
        guard rv == Self.success, length > 0, length < 65536 else { return nil }
        var buffer = [CChar](repeating: 0, count: Int(length))
        rv = Int(SCardListReaders(context, nil, &buffer, &length))
        if rv == Self.noReadersAvailable { return [] }
        guard rv == Self.success else { return nil }
        // A multi-string: names separated by NUL, ended by an empty name.
        return buffer.split(separator: 0, omittingEmptySubsequences: true).map {
            String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    static func describe(_ rv: Int) -> String {
        if let s = pcsc_stringify_error(LONG(rv)) { return String(cString: s) + " (\(hexNumber(UInt(bitPattern: rv))))" }
        return hexNumber(UInt(bitPattern: rv))
    }
}

/// Gives `body` stable C strings for `strings` for the duration of the call.
private func withCStrings<R>(_ strings: [String], _ body: ([UnsafeMutablePointer<CChar>]) -> R) -> R {
    // SAFETY: strdup'ed copies live until the defer frees them, after body returns.
    let copies = strings.map { strdup($0)! }
    defer { copies.forEach { free($0) } }
    return body(copies)
}
