import CShims
import Glibc

/// A pthread mutex with a condition variable, on the heap so their addresses never move.
///
/// Used where a thread must block and be woken (the wire client's readers, the proxy's
/// C_WaitForSlotEvent) and to serialise the work on one session; Synchronization's Mutex
/// has no condition variable.
public final class Monitor: @unchecked Sendable {
    // @unchecked: the pthread objects are only touched through pthread calls, which are
    // thread-safe by definition.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        // Timed waits measure against the monotonic clock: a wall-clock jump must not
        // stretch or cut a wait.
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

    /// Runs `body` with the mutex held.
    public func locked<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits on the condition (the mutex must be held) for at most `milliseconds`.
    public func wait(milliseconds: Int) {
        var deadline = Self.deadline(milliseconds)
        _ = pthread_cond_timedwait(condition, mutex, &deadline)
    }

    /// `wait(milliseconds:)` for code inside the proxy's fork gate (CShims): the thread gives
    /// up its place in the gate while it waits, so a host's fork never waits for an event.
    public func waitOutsideForkGate(milliseconds: Int) {
        var deadline = Self.deadline(milliseconds)
        _ = pincache_cond_timedwait_outside_fork_gate(condition, mutex, &deadline)
    }

    /// `milliseconds` from now on the monotonic clock the condition measures with.
    private static func deadline(_ milliseconds: Int) -> timespec {
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let nanos = Int(deadline.tv_nsec) + (milliseconds % 1000) * 1_000_000
        deadline.tv_sec += milliseconds / 1000 + nanos / 1_000_000_000
        deadline.tv_nsec = nanos % 1_000_000_000
        return deadline
    }

    /// Wakes every waiter (call with the mutex held).
    public func broadcast() { pthread_cond_broadcast(condition) }
}
