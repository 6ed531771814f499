import Glibc

/// A PIN in a fixed, NUL-terminated C buffer that is locked in memory where possible and
/// wiped with `explicit_bzero` when released: the PIN never becomes a Swift `String`.
final class PINBuffer {
    /// Longest PIN accepted, in bytes (the daemon's own limit is 256).
    static let maximumLength = 256

    /// `maximumLength + 1` bytes; always NUL-terminated after `count`.
    let pointer: UnsafeMutablePointer<CChar>
    private(set) var count = 0
    private let locked: Bool

    init() {
        let size = Self.maximumLength + 1
        pointer = .allocate(capacity: size)
        pointer.initialize(repeating: 0, count: size)
        // Best effort: a client that cannot lock a page still keeps the PIN out of Strings
        // and wipes it; swap exposure for the few seconds of one call is accepted.
        locked = mlock(pointer, size) == 0
    }

    deinit {
        wipe()
        if locked { munlock(pointer, Self.maximumLength + 1) }
        pointer.deallocate()
    }

    func wipe() {
        explicit_bzero(pointer, Self.maximumLength + 1)
        count = 0
    }

    /// Appends one byte; false when the PIN would exceed `maximumLength`.
    func append(_ byte: UInt8) -> Bool {
        guard count < Self.maximumLength else { return false }
        pointer[count] = CChar(bitPattern: byte)
        count += 1
        return true
    }

    /// Drops a trailing carriage return (a PIN typed or piped from a CRLF file).
    func trimCarriageReturn() {
        if count > 0 && pointer[count - 1] == 13 {
            count -= 1
            pointer[count] = 0
        }
    }
}

enum PINError: Error {
    case noTerminal
    case tooLong
    case empty
    case interrupted
    case invalidByte

    var message: String {
        switch self {
        case .noTerminal: "no terminal to read the PIN from (use --pin-stdin)"
        case .tooLong: "PIN longer than \(PINBuffer.maximumLength) bytes"
        case .empty: "no PIN given"
        case .interrupted: "reading the PIN failed"
        case .invalidByte: "a PIN cannot contain a NUL byte"
        }
    }
}

/// Reads one line (up to newline or end of file) from `fd` into `buffer`, byte by byte so
/// nothing after the line is consumed and no copy of the PIN sits in a stdio buffer.
private func readLine(fd: Int32, into buffer: PINBuffer) throws(PINError) {
    var byte: UInt8 = 0
    while true {
        let n = read(fd, &byte, 1)
        if n < 0 {
            if errno == EINTR { continue }
            throw .interrupted
        }
        if n == 0 || byte == 10 { break }
        if byte == 0 { byte = 0; throw .invalidByte }
        guard buffer.append(byte) else {
            byte = 0
            throw .tooLong
        }
    }
    byte = 0
    buffer.trimCarriageReturn()
}

/// Reads the PIN as one line from standard input (`--pin-stdin`).
func readPINFromStdin() throws(PINError) -> PINBuffer {
    let buffer = PINBuffer()
    try readLine(fd: STDIN_FILENO, into: buffer)
    guard buffer.count > 0 else { throw .empty }
    return buffer
}

// The terminal state to put back if a signal ends the program while echo is off. Set before
// the handlers are installed, so the handler reads initialised memory only.
nonisolated(unsafe) private var savedTerminal = termios()
nonisolated(unsafe) private var terminalFD: Int32 = -1

private let restoreTerminalAndReraise: @convention(c) (Int32) -> Void = { signo in
    // Only async-signal-safe calls here: tcsetattr, signal, raise.
    if terminalFD >= 0 { tcsetattr(terminalFD, TCSANOW, &savedTerminal) }
    signal(signo, SIG_DFL)
    raise(signo)
}

/// Prompts on /dev/tty and reads the PIN with echo off (termios), restoring the terminal
/// afterwards, also when Ctrl-C or a termination signal interrupts the prompt.
func readPINFromTerminal(prompt: String) throws(PINError) -> PINBuffer {
    let fd = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC)
    guard fd >= 0 else { throw .noTerminal }
    defer { close(fd) }
    var original = termios()
    guard tcgetattr(fd, &original) == 0 else { throw .noTerminal }

    _ = prompt.withCString { write(fd, $0, strlen($0)) }
    savedTerminal = original
    terminalFD = fd
    let handled = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGTSTP]
    let previous = handled.map { signal($0, restoreTerminalAndReraise) }
    defer {
        for (signo, handler) in zip(handled, previous) { signal(signo, handler) }
        terminalFD = -1
    }

    var silent = original
    silent.c_lflag &= ~tcflag_t(ECHO)
    // The newline still echoes, so the next output starts on its own line.
    silent.c_lflag |= tcflag_t(ECHONL)
    guard tcsetattr(fd, TCSAFLUSH, &silent) == 0 else { throw .noTerminal }
    defer { tcsetattr(fd, TCSAFLUSH, &original) }

    let buffer = PINBuffer()
    try readLine(fd: fd, into: buffer)
    guard buffer.count > 0 else { throw .empty }
    return buffer
}
