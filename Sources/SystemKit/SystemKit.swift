#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CShims

// The handful of OS services the programs used Foundation for (threads, a condition
// variable, sleeping, whole-file reads, writes to a descriptor). Foundation on Linux brings
// ICU with it: linked statically it was 45 MB of each installed binary (issue 16 §2).

/// Starts a detached OS thread running `body`. `name` is what ps and gdb show; Linux keeps
/// the first 15 bytes.
public func startThread(name: String, _ body: @escaping @Sendable () -> Void) {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        let name: String
        init(_ body: @escaping @Sendable () -> Void, _ name: String) {
            self.body = body
            self.name = name
        }
    }
    let context = Unmanaged.passRetained(Box(body, name)).toOpaque()
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    defer { pthread_attr_destroy(&attributes) }
    #if canImport(Glibc)
    var thread = pthread_t()
    #else
    var thread: pthread_t?
    #endif
    let created = pthread_create(&thread, &attributes, { raw in
        #if canImport(Glibc)
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        setThreadName(box.name)
        #else
        let box = Unmanaged<Box>.fromOpaque(raw).takeRetainedValue()
        #endif
        box.body()
        return nil
    }, context)
    // Without its thread the program cannot do its job (a token worker, the signal thread):
    // stopping here is better than running without it.
    precondition(created == 0, "pthread_create failed (\(created)) for \(name)")
}

/// Names the calling thread (ps and top show the first 15 bytes).
public func setThreadName(_ name: String) {
    pincache_name_this_thread(name)
}

/// Sleeps the calling OS thread (never call it on Swift's cooperative pool).
public func sleep(seconds: Double) {
    guard seconds > 0 else { return }
    let whole = seconds.rounded(.down)
    var request = timespec(tv_sec: Int(whole), tv_nsec: Int((seconds - whole) * 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of ``ConditionLock/wait(until:)``.
public func monotonicNanoseconds() -> UInt64 {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
}

/// A mutex with a condition variable (pthread's), for queues served by OS threads.
public final class ConditionLock: @unchecked Sendable {
    // @unchecked: the pthread objects are the synchronisation; they live in stable heap memory.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
        // Timed waits count on the monotonic clock: a wall-clock step must not stretch them.
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }
    /// Waits for a signal; the lock must be held, and is held again on return.
    public func wait() { pthread_cond_wait(condition, mutex) }
    /// Waits for a signal or until `deadline` (``monotonicNanoseconds()``); the lock must be
    /// held, and is held again on return. Wakes early like `wait()`: callers re-check.
    public func wait(until deadline: UInt64) {
        var t = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        pthread_cond_timedwait(condition, mutex, &t)
    }
    public func signal() { pthread_cond_signal(condition) }
    public func broadcast() { pthread_cond_broadcast(condition) }

    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// Writes every byte to `fd`, retrying short writes and EINTR; false if the descriptor fails.
@discardableResult
public func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
        if n < 0 {
            if errno == EINTR { continue }
            return false
        }
        offset += n
    }
    return true
}

@discardableResult
public func writeAll(_ fd: Int32, _ text: String) -> Bool { writeAll(fd, Array(text.utf8)) }

/// The whole content of a descriptor (standard input, a pipe), read until end of file.
public func readAll(_ fd: Int32) throws(SystemError) -> [UInt8] {
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        if n < 0 {
            if errno == EINTR { continue }
            throw SystemError(call: "read", errno: errno)
        }
        if n == 0 { return out }
        out += chunk[0..<n]
    }
}

/// The whole content of a file.
public func readFile(_ path: String) throws(SystemError) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SystemError(call: "open", path: path, errno: errno) }
    defer { close(fd) }
    do { return try readAll(fd) } catch { throw SystemError(call: "read", path: path, errno: error.errno) }
}

/// The target of a symbolic link (readlink(2)), nil if `path` is not one or cannot be read.
public func readLink(_ path: String) -> String? {
    var buffer = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = buffer.withUnsafeMutableBytes { readlink(path, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count - 1) }
    guard n >= 0 else { return nil }
    return String(decoding: buffer[0..<n], as: UTF8.self)
}

/// The last component of a slash-separated path ("/usr/lib/x.so" → "x.so").
public func lastPathComponent(_ path: String) -> String {
    let trimmed = path.hasSuffix("/") && path.count > 1 ? String(path.dropLast()) : path
    guard let slash = trimmed.lastIndex(of: "/") else { return trimmed }
    return String(trimmed[trimmed.index(after: slash)...])
}

/// Lower-case hexadecimal, two digits per byte.
public func hexString(_ bytes: some Sequence<UInt8>) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    for b in bytes {
        out.append(digits[Int(b >> 4)])
        out.append(digits[Int(b & 15)])
    }
    return String(decoding: out, as: UTF8.self)
}

/// `0x` and `width` hexadecimal digits, zero-padded (return codes, mechanism numbers).
public func hexNumber<T: BinaryInteger>(_ value: T, width: Int = 8) -> String {
    let digits = String(value, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, width - digits.count)) + digits
}

/// A failed system call, with errno's text.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public let call: String
    public let path: String?
    public let errno: Int32

    public init(call: String, path: String? = nil, errno: Int32) {
        self.call = call
        self.path = path
        self.errno = errno
    }

    public var description: String {
        let reason = String(cString: strerror(errno))
        return path.map { "\($0): \(reason)" } ?? "\(call): \(reason)"
    }
}

/// Spaces and tabs trimmed from both ends.
public func trimmed(_ text: some StringProtocol) -> String {
    let isBlank: (Character) -> Bool = { $0 == " " || $0 == "\t" }
    guard let first = text.firstIndex(where: { !isBlank($0) }), let last = text.lastIndex(where: { !isBlank($0) }) else { return "" }
    return String(text[first...last])
}

/// Replaces `path` with `bytes`: written to a temporary file beside it, then renamed, so a
/// reader never sees half a file.
public func writeFile(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644) throws(SystemError) {
    let temporary = path + ".tmp-\(getpid())"
    let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
    guard fd >= 0 else { throw SystemError(call: "open", path: temporary, errno: errno) }
    let written = writeAll(fd, bytes)
    let failure = errno
    guard close(fd) == 0, written else {
        unlink(temporary)
        throw SystemError(call: "write", path: path, errno: written ? errno : failure)
    }
    guard rename(temporary, path) == 0 else {
        let failure = errno
        unlink(temporary)
        throw SystemError(call: "rename", path: path, errno: failure)
    }
}
