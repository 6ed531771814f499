import Glibc
import Testing

@testable import PincacheService

/// Issue 15 §5: the caller's executable, with the pid's start time guarding against reuse.
@Suite struct ExecutablePathTests {
    @Test func ownProcessResolvesToTheTestBinary() throws {
        let pid = UInt32(getpid())
        let exe = try #require(executablePath(pid: pid, uid: getuid()))
        #expect(exe.hasPrefix("/") && exe.contains("pincache"))
    }

    @Test func startTimeIsReadFromProcStat() throws {
        let mine = try #require(processStartTime(UInt32(getpid())))
        // /proc/1 started before this test; the clock ticks only forward.
        let first = try #require(processStartTime(1))
        #expect(first <= mine)
        #expect(processStartTime(UInt32(Int32.max)) == nil)  // no such process
    }

    @Test func anotherUidIsRefused() {
        #expect(executablePath(pid: UInt32(getpid()), uid: getuid() &+ 1) == nil)
    }
}
