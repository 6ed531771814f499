import CShims
import Glibc
import Synchronization

/// Why a PIN could not be put into protected memory.
public enum SecretError: Error, Sendable, Equatable {
    /// `mmap`, `mlock` or `madvise(MADV_DONTDUMP)` failed with this errno: caching must be
    /// refused (DESIGN §1 "Secrets": never silently weakened).
    case cannotLockMemory(errno: Int32)
    /// The PIN is longer than ``SecretPIN/maximumLength``.
    case tooLong(maximum: Int)
}

/// A failed libc call, as thrown by ``ProcessHardening``.
public struct SystemCallError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The C function that failed.
    public var function: String
    /// Its `errno`.
    public var errno: Int32

    public var description: String { "\(function): \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// A PIN held in memory that is `mlock`ed (never swapped), `MADV_DONTDUMP` (never in a core
/// dump) and `MADV_WIPEONFORK` where the kernel has it, taken from an arena of locked pages
/// cut into slots of ``maximumLength`` bytes.
///
/// The bytes are never copied into a Swift `String` or `Array`: read them only inside
/// ``withBytes(_:)``. They are wiped with `explicit_bzero` by ``wipe()`` and again in `deinit`,
/// so dropping the last reference is enough to erase a PIN. If memory cannot be locked the
/// initialiser throws: caching is refused, never silently weakened.
public final class SecretPIN: @unchecked Sendable {
    /// Longest PIN accepted, in bytes; also the arena's slot size.
    public static let maximumLength = LockedArena.slotSize

    private let arena: LockedArena
    private let slot: UnsafeMutableRawPointer
    // Guarded by `lock`; `slot` never changes, so only its contents and `length` need it.
    private var length: Int
    // Readers (`withBytes`) share; `wipe` excludes them, so a bracket in flight never sees
    // its PIN zeroed halfway through C_Login. A pthread lock because `withBytes` is generic
    // over a non-Sendable result, which `Mutex.withLock` would have to `send`.
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    /// Copies `bytes` into locked memory of the process-wide arena.
    /// - Throws: ``SecretError/tooLong(maximum:)`` or ``SecretError/cannotLockMemory(errno:)``.
    public convenience init(copying bytes: UnsafeRawBufferPointer) throws(SecretError) {
        try self.init(copying: bytes, arena: LockedArena.shared)
    }

    /// Test seam: the same, from a given arena.
    init(copying bytes: UnsafeRawBufferPointer, arena: LockedArena) throws(SecretError) {
        guard bytes.count <= Self.maximumLength else { throw .tooLong(maximum: Self.maximumLength) }
        let slot = try arena.allocate()
        if let source = bytes.baseAddress, bytes.count > 0 {
            // SAFETY: the slot is `maximumLength` bytes of our mapping and `bytes.count` was
            // checked against it above; the source is valid for `bytes.count` bytes.
            slot.copyMemory(from: source, byteCount: bytes.count)
        }
        self.arena = arena
        self.slot = slot
        self.length = bytes.count
        self.lock = .allocate(capacity: 1)
        pthread_rwlock_init(lock, nil)
    }

    deinit {
        // SAFETY: no other reference exists, so nobody is inside `withBytes`.
        explicit_bzero(slot, Self.maximumLength)
        arena.release(slot)
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    /// Number of PIN bytes; 0 after ``wipe()``.
    public var count: Int {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return length
    }

    /// Lends the PIN bytes to `body`. The buffer is valid only during the call and must not
    /// be copied into Swift collections; `body` must not call ``wipe()`` on the same PIN
    /// (it would wait for itself).
    public func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        // SAFETY: `slot` is valid for `maximumLength` ≥ `length` bytes until deinit, which
        // cannot run while `self` is borrowed here; the read lock keeps `wipe` out.
        return try body(UnsafeRawBufferPointer(start: UnsafeRawPointer(slot), count: length))
    }

    /// Zeroes the PIN now (`explicit_bzero`); idempotent. Waits for readers in ``withBytes(_:)``.
    public func wipe() {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        explicit_bzero(slot, Self.maximumLength)
        length = 0
    }

    /// Test hook: where the bytes live, to check the raw memory after a wipe.
    var slotAddressForTesting: UnsafeRawPointer { UnsafeRawPointer(slot) }
}

/// Statistics of the process-wide arena of locked pages behind every ``SecretPIN``.
public enum SecretArena {
    /// Bytes currently mapped and `mlock`ed for PINs (whole pages; pages are returned to the
    /// system once all their slots are free).
    public static var lockedBytes: Int { LockedArena.shared.lockedBytes }
    /// Bytes one PIN occupies in the arena, whatever its length.
    public static var slotSize: Int { LockedArena.slotSize }
}

/// Process-wide protections for a daemon that holds secrets.
public enum ProcessHardening {
    /// Makes the process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`) and sets `RLIMIT_CORE` to 0
    /// (`pincache_disable_core_dumps`). Also stops same-uid processes from ptrace-attaching.
    ///
    /// Crash signals get their default action back (`pincache_default_crash_signals`): the
    /// Swift runtime's backtracer would otherwise print the memory that registers point at
    /// (a PIN during `C_Login`) to the log, and keep the process running after `kill -SEGV`.
    /// - Throws: ``SystemCallError`` with the failing call's errno.
    public static func disableCoreDumps() throws {
        if pincache_disable_core_dumps() != 0 {
            throw SystemCallError(function: "pincache_disable_core_dumps", errno: errno)
        }
        if pincache_default_crash_signals() != 0 {
            throw SystemCallError(function: "pincache_default_crash_signals", errno: errno)
        }
    }

    /// Makes `free` overwrite the memory it releases (glibc `mallopt(M_PERTURB)`).
    ///
    /// libdbus reads each connection's socket into one growing buffer and hands it back to
    /// the heap when it shrinks or moves it, with the raw bytes of the messages it held: a
    /// Login's PIN among them, out of reach of anything that wipes the parsed message. Those
    /// buffers are at least 2 KiB, beyond the per-thread cache that glibc does not perturb.
    /// - Throws: ``SystemCallError`` if glibc refuses.
    public static func wipeFreedMemory() throws {
        if pincache_wipe_freed_memory() != 0 {
            throw SystemCallError(function: "mallopt(M_PERTURB)", errno: EINVAL)
        }
    }
}

/// Pages of locked memory cut into fixed-size slots. Slots of one size keep the arena free of
/// fragmentation and make a slot's page a matter of arithmetic.
final class LockedArena: Sendable {
    static let slotSize = 256
    /// Keeps one empty page: a daemon whose only PIN comes and goes (a login, a bracket)
    /// would otherwise map, lock, unlock and unmap a page each time (10–18 µs on a VM).
    static let shared = LockedArena(keepsOneEmptyPage: true)

    private struct Page {
        // Addresses as integers keep the state Sendable; they are only ever turned back into
        // pointers inside this file.
        var base: UInt
        var freeSlots: [Int]
    }

    private struct State {
        var pages: [Page] = []
    }

    let pageSize: Int
    private let slotsPerPage: Int
    /// Refuse to map more than this many pages (a test seam standing in for `RLIMIT_MEMLOCK`).
    private let pageLimit: Int?
    /// Tests keep empty pages mapped so they can read a freed slot.
    private let releasesEmptyPages: Bool
    /// The last empty page stays mapped (wiped: every slot was wiped by its owner).
    private let keepsOneEmptyPage: Bool
    private let state = Mutex(State())

    init(pageLimit: Int? = nil, releasesEmptyPages: Bool = true, keepsOneEmptyPage: Bool = false) {
        self.keepsOneEmptyPage = keepsOneEmptyPage
        let reported = sysconf(Int32(_SC_PAGESIZE))
        // A page smaller than one slot does not exist on Linux; the max keeps the arithmetic sane anyway.
        pageSize = max(reported > 0 ? reported : 4096, Self.slotSize)
        slotsPerPage = pageSize / Self.slotSize
        self.pageLimit = pageLimit
        self.releasesEmptyPages = releasesEmptyPages
    }

    var lockedBytes: Int { state.withLock { $0.pages.count * pageSize } }

    func allocate() throws(SecretError) -> UnsafeMutableRawPointer {
        let result: Result<UInt, SecretError> = state.withLock { state in
            if let index = state.pages.firstIndex(where: { !$0.freeSlots.isEmpty }) {
                let slot = state.pages[index].freeSlots.removeLast()
                return .success(state.pages[index].base + UInt(slot * Self.slotSize))
            }
            if let limit = pageLimit, state.pages.count >= limit {
                return .failure(.cannotLockMemory(errno: ENOMEM))
            }
            switch mapLockedPage() {
            case .failure(let error):
                return .failure(error)
            case .success(let base):
                // Hand out slot 0; the rest are free, popped from the end.
                state.pages.append(Page(base: base, freeSlots: Array((1..<slotsPerPage).reversed())))
                return .success(base)
            }
        }
        switch result {
        case .success(let address):
            // SAFETY: a non-zero address inside one of our live mappings.
            return UnsafeMutableRawPointer(bitPattern: address)!
        case .failure(let error):
            throw error
        }
    }

    func release(_ slot: UnsafeMutableRawPointer) {
        let address = UInt(bitPattern: slot)
        let pageMask = ~UInt(pageSize - 1)
        let pageBase = address & pageMask
        state.withLock { state in
            guard let index = state.pages.firstIndex(where: { $0.base == pageBase }) else { return }
            state.pages[index].freeSlots.append(Int(address - pageBase) / Self.slotSize)
            let emptyPages = state.pages.count { $0.freeSlots.count == slotsPerPage }
            if releasesEmptyPages, state.pages[index].freeSlots.count == slotsPerPage,
                !(keepsOneEmptyPage && emptyPages == 1)
            {
                let page = state.pages.remove(at: index)
                // SAFETY: every slot of this page is free and was wiped by its owner's deinit.
                let pointer = UnsafeMutableRawPointer(bitPattern: page.base)!
                munlock(pointer, pageSize)
                munmap(pointer, pageSize)
            }
        }
    }

    private func mapLockedPage() -> Result<UInt, SecretError> {
        let mapped = mmap(nil, pageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let pointer = mapped, pointer != MAP_FAILED else {
            return .failure(.cannotLockMemory(errno: errno))
        }
        // SAFETY: `pointer` is a fresh private mapping of `pageSize` bytes owned by this arena.
        if pincache_madvise_dontdump(pointer, pageSize) != 0 || mlock(pointer, pageSize) != 0 {
            let failure = errno
            munmap(pointer, pageSize)
            return .failure(.cannotLockMemory(errno: failure))
        }
        // Best effort: kernels before 4.14 lack it, and the daemon never forks anyway.
        _ = madvise(pointer, pageSize, MADV_WIPEONFORK)
        return .success(UInt(bitPattern: pointer))
    }
}
