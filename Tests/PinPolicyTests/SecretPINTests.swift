import Foundation
import Glibc
import Testing
@testable import PinPolicy

/// A SecretPIN from test text (tests may hold PINs in Strings; the daemon may not).
func makePIN(_ text: String, arena: LockedArena? = nil) throws -> SecretPIN {
    var bytes = Array(text.utf8)
    defer { bytes.withUnsafeMutableBytes { explicit_bzero($0.baseAddress!, $0.count) } }
    return try bytes.withUnsafeBytes { raw throws(SecretError) in
        if let arena { return try SecretPIN(copying: raw, arena: arena) }
        return try SecretPIN(copying: raw)
    }
}

func text(of pin: SecretPIN) -> String {
    pin.withBytes { String(decoding: $0, as: UTF8.self) }
}

func rawSlot(_ address: UnsafeRawPointer) -> [UInt8] {
    Array(UnsafeRawBufferPointer(start: address, count: SecretPIN.maximumLength))
}

/// The kernel's VmFlags for the mapping that contains `address` (from /proc/self/smaps).
func vmFlags(containing address: UnsafeRawPointer) throws -> Set<String> {
    // Read with a loop: /proc files report size 0 and Foundation stops after one page.
    let fd = open("/proc/self/smaps", O_RDONLY)
    guard fd >= 0 else { throw CocoaError(.fileReadNoSuchFile) }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        bytes += chunk[..<n]
    }
    let smaps = String(decoding: bytes, as: UTF8.self)
    let target = UInt(bitPattern: address)
    var inside = false
    for line in smaps.split(separator: "\n") {
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        if let range = fields.first, range.contains("-"), !range.hasSuffix(":") {
            let bounds = range.split(separator: "-").compactMap { UInt($0, radix: 16) }
            inside = bounds.count == 2 && bounds[0] <= target && target < bounds[1]
        } else if inside, fields.first == "VmFlags:" {
            return Set(fields.dropFirst().map(String.init))
        }
    }
    throw CocoaError(.fileReadCorruptFile)
}

@Suite struct SecretPINTests {
    @Test func bytesRoundTrip() throws {
        let pin = try makePIN("123456")
        #expect(pin.count == 6)
        #expect(text(of: pin) == "123456")
        let binary: [UInt8] = [0, 0xFF, 0x80, 0x7F, 0]
        let copy = try binary.withUnsafeBytes { try SecretPIN(copying: $0) }
        #expect(copy.withBytes { Array($0) } == binary)
    }

    @Test func emptyAndMaximumLength() throws {
        let empty = try makePIN("")
        #expect(empty.count == 0)
        #expect(SecretPIN.maximumLength == 256)
        let longest = try makePIN(String(repeating: "7", count: 256))
        #expect(longest.count == 256)
        #expect(text(of: longest) == String(repeating: "7", count: 256))
    }

    @Test func tooLongIsRefused() {
        let bytes = [UInt8](repeating: 0x31, count: 257)
        #expect(throws: SecretError.tooLong(maximum: 256)) {
            try bytes.withUnsafeBytes { try SecretPIN(copying: $0) }
        }
    }

    @Test func wipeZeroesTheSlotAndIsIdempotent() throws {
        let arena = LockedArena()
        let pin = try makePIN("secret-pin", arena: arena)
        let address = pin.slotAddressForTesting
        #expect(rawSlot(address).prefix(10) == ArraySlice(Array("secret-pin".utf8)))
        pin.wipe()
        #expect(pin.count == 0)
        #expect(pin.withBytes { $0.count } == 0)
        #expect(rawSlot(address).allSatisfy { $0 == 0 })
        pin.wipe()
        #expect(pin.count == 0)
    }

    @Test func deinitWipesTheSlot() throws {
        let arena = LockedArena(releasesEmptyPages: false)   // keep the page mapped to look at it
        var pin: SecretPIN? = try makePIN("9876543210", arena: arena)
        let address = pin!.slotAddressForTesting
        #expect(rawSlot(address).contains { $0 != 0 })
        pin = nil
        #expect(rawSlot(address).allSatisfy { $0 == 0 })
    }

    @Test func slotsAreReusedAndPagesAccounted() throws {
        let arena = LockedArena()
        #expect(arena.lockedBytes == 0)
        let slotsPerPage = arena.pageSize / SecretPIN.maximumLength
        var pins: [SecretPIN] = []
        pins.append(try makePIN("1", arena: arena))
        #expect(arena.lockedBytes == arena.pageSize)
        for _ in 1..<slotsPerPage { pins.append(try makePIN("2", arena: arena)) }
        #expect(arena.lockedBytes == arena.pageSize)
        pins.append(try makePIN("3", arena: arena))
        #expect(arena.lockedBytes == 2 * arena.pageSize)
        let addresses = Set(pins.map { UInt(bitPattern: $0.slotAddressForTesting) })
        #expect(addresses.count == pins.count)
        pins.removeLast()
        #expect(arena.lockedBytes == arena.pageSize)
        pins.removeAll()
        #expect(arena.lockedBytes == 0)
    }

    @Test func theSharedArenaKeepsOneEmptyPage() throws {
        let arena = LockedArena(keepsOneEmptyPage: true)
        let slotsPerPage = arena.pageSize / SecretPIN.maximumLength
        var pins = try (0...slotsPerPage).map { _ in try makePIN("5", arena: arena) }
        #expect(arena.lockedBytes == 2 * arena.pageSize)
        pins.removeAll()
        #expect(arena.lockedBytes == arena.pageSize, "one empty page kept, the other returned")
        let again = try makePIN("6", arena: arena)
        #expect(arena.lockedBytes == arena.pageSize, "the kept page is reused")
        _ = again
    }

    @Test func sharedArenaCountsLivePINs() throws {
        let pin = try makePIN("0000")
        #expect(SecretArena.lockedBytes >= SecretArena.slotSize)
        #expect(SecretArena.lockedBytes % Int(sysconf(Int32(_SC_PAGESIZE))) == 0)
        _ = pin
    }

    @Test func memoryIsLockedAndExcludedFromDumps() throws {
        let arena = LockedArena()
        let pin = try makePIN("4711", arena: arena)
        let flags = try vmFlags(containing: pin.slotAddressForTesting)
        #expect(flags.contains("lo"), "mlock'ed")
        #expect(flags.contains("dd"), "MADV_DONTDUMP")
        #expect(flags.contains("wf"), "MADV_WIPEONFORK")
    }

    @Test func lockFailureRefusesTheSecret() throws {
        let arena = LockedArena(pageLimit: 0)
        #expect(throws: SecretError.cannotLockMemory(errno: ENOMEM)) { try makePIN("1234", arena: arena) }
        #expect(arena.lockedBytes == 0)
    }

    @Test func readersShareWhileWipeWaits() async throws {
        let pin = try makePIN("246810")
        await withTaskGroup(of: String.self) { group in
            for _ in 0..<8 { group.addTask { text(of: pin) } }
            for await value in group { #expect(value == "246810") }
        }
        pin.wipe()
        #expect(text(of: pin).isEmpty)
    }

    @Test func coreDumpsDisabled() throws {
        try ProcessHardening.disableCoreDumps()
        var limit = rlimit()
        #expect(getrlimit(__rlimit_resource_t(RLIMIT_CORE.rawValue), &limit) == 0)
        #expect(limit.rlim_cur == 0 && limit.rlim_max == 0)
    }
}
