import Foundation
import Synchronization
import Testing

@testable import PincacheService

/// SerialWorker.runInline: a job runs on the caller's thread only when the worker is idle and
/// fast, and never at the same time as another job.
@Suite struct SerialWorkerTests {
    @Test func idleFastWorkerRunsInlineOnTheCallersThread() {
        let worker = SerialWorker(name: "test")
        defer { worker.stop() }
        let caller = pthread_self()
        let ranHere = Mutex(false)
        let ran = worker.runInline(ifFasterThan: 5_000_000) { ranHere.withLock { $0 = pthread_equal(pthread_self(), caller) != 0 } }
        #expect(ran)
        #expect(ranHere.withLock { $0 })
    }

    /// The hooks a shared login relies on (issue 14 §1): every job, queued or inline, is
    /// announced before it runs with its owner only if it was submitted shareable; after it, the
    /// worker says whether another is waiting; a running job sees whether the next is shareable.
    @Test func hooksSeeEveryJobAndTheNextShareableOne() {
        let worker = SerialWorker(name: "hooks")
        defer { worker.stop() }
        let events = Mutex<[String]>([])
        worker.setHooks(
            SerialWorker.Hooks(
                beforeJob: { owner in events.withLock { $0.append("before:\(owner ?? "-")") } },
                afterJob: { more in
                    events.withLock { $0.append("after:\(more)") }
                    return nil
                },
                idle: { events.withLock { $0.append("idle") } }))
        let started = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let next = Mutex<[String?]>([])
        let done = DispatchGroup()
        done.enter()
        worker.submit(owner: "a", shareable: true) {
            started.signal()
            release.wait()
            next.withLock { $0.append(worker.nextShareableOwner) }
        }
        started.wait()
        done.enter()
        worker.submit(owner: "b", shareable: true) { next.withLock { $0.append(worker.nextShareableOwner) } }
        worker.submit(owner: "c") { done.leave() }
        worker.submit(owner: "b") { done.leave() }
        let idle = DispatchSemaphore(value: 0)
        worker.submit { idle.signal() }
        release.signal()
        done.wait()
        idle.wait()
        #expect(next.withLock { $0 } == ["b", nil])
        usleep(10_000)  // the last job's afterJob
        #expect(
            events.withLock { $0 } == [
                "before:a", "after:true", "before:b", "after:true", "before:-", "after:true", "before:-", "after:true",
                "before:-", "after:false",
            ])
        #expect(worker.runInline(ifFasterThan: .max, owner: "d", shareable: true) {})
        usleep(10_000)
        #expect(events.withLock { Array($0.suffix(2)) } == ["before:d", "after:false"])
    }

    /// A lingering login (issue 14 §1): the idle hook runs once the time afterJob asked for has
    /// passed with no job started, inside the jobs' exclusion; a job that starts first (queued
    /// or inline) cancels it, and stop() runs a pending one before the thread ends.
    @Test func idleHookRunsAfterTheLingerUnlessAJobStartsFirst() {
        let worker = SerialWorker(name: "idle")
        let events = Mutex<[String]>([])
        let inside = Atomic<Int>(0)
        let overlaps = Atomic<Int>(0)
        let linger = Mutex<UInt64?>(30_000_000)
        worker.setHooks(
            SerialWorker.Hooks(
                beforeJob: { _ in events.withLock { $0.append("before") } },
                afterJob: { more in more ? nil : linger.withLock { $0 } },
                idle: {
                    if inside.wrappingAdd(1, ordering: .sequentiallyConsistent).newValue != 1 {
                        overlaps.wrappingAdd(1, ordering: .relaxed)
                    }
                    events.withLock { $0.append("idle") }
                    inside.wrappingSubtract(1, ordering: .sequentiallyConsistent)
                }))
        let done = DispatchSemaphore(value: 0)
        worker.submit { done.signal() }
        done.wait()
        // Within the linger a second job starts: no idle in between.
        usleep(5_000)
        #expect(worker.runInline(ifFasterThan: .max) {})
        #expect(events.withLock { $0 } == ["before", "before"])
        usleep(100_000)
        #expect(events.withLock { $0 } == ["before", "before", "idle"])
        // Nothing asked for: no idle.
        linger.withLock { $0 = nil }
        worker.submit { done.signal() }
        done.wait()
        usleep(60_000)
        #expect(events.withLock { $0 } == ["before", "before", "idle", "before"])
        // A long linger is cut short by stop().
        linger.withLock { $0 = 60_000_000_000 }
        worker.submit { done.signal() }
        done.wait()
        usleep(5_000)
        worker.stop()
        var waited = 0
        while events.withLock({ $0.count }) < 6 && waited < 500 {
            usleep(10_000)
            waited += 1
        }
        #expect(events.withLock { $0 } == ["before", "before", "idle", "before", "before", "idle"])
        #expect(overlaps.load(ordering: .relaxed) == 0)
    }

    @Test func busyWorkerRefusesInline() {
        let worker = SerialWorker(name: "test")
        defer { worker.stop() }
        let started = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        worker.submit {
            started.signal()
            release.wait()
        }
        started.wait()
        var ran = false
        #expect(!worker.runInline(ifFasterThan: .max) { ran = true })
        #expect(!ran)
        release.signal()
    }

    @Test func slowWorkerKeepsItsJobs() {
        let worker = SerialWorker(name: "test")
        defer { worker.stop() }
        // Jobs of 20 ms raise the average well above a 1 ms limit.
        for _ in 0..<8 {
            #expect(worker.runInline(ifFasterThan: .max) { usleep(20_000) })
        }
        #expect(!worker.runInline(ifFasterThan: 1_000_000) {})
    }

    @Test func inlineAndQueuedJobsNeverOverlap() {
        let worker = SerialWorker(name: "test")
        defer { worker.stop() }
        let inside = Atomic<Int>(0)
        let overlaps = Atomic<Int>(0)
        let total = Atomic<Int>(0)
        let body: @Sendable () -> Void = {
            if inside.wrappingAdd(1, ordering: .sequentiallyConsistent).newValue != 1 {
                overlaps.wrappingAdd(1, ordering: .relaxed)
            }
            for _ in 0..<200 { _ = total.wrappingAdd(0, ordering: .relaxed) }
            inside.wrappingSubtract(1, ordering: .sequentiallyConsistent)
            total.wrappingAdd(1, ordering: .relaxed)
        }
        let group = DispatchGroup()
        for t in 0..<4 {
            group.enter()
            Thread {
                for i in 0..<2_000 {
                    if (i + t) % 3 == 0 || !worker.runInline(ifFasterThan: .max, body) { worker.submit(body) }
                }
                group.leave()
            }.start()
        }
        group.wait()
        let drained = DispatchSemaphore(value: 0)
        worker.submit { drained.signal() }
        drained.wait()
        #expect(overlaps.load(ordering: .relaxed) == 0)
        #expect(total.load(ordering: .relaxed) == 8_000)
    }
}

/// Issue 12 §2: jobs of different owners are served round-robin.
@Suite struct SerialWorkerFairnessTests {
    @Test func anotherOwnersJobWaitsForAtMostTheRunningOne() {
        let worker = SerialWorker(name: "fair")
        defer { worker.stop() }
        let order = Mutex<[String]>([])
        let firstRunning = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        worker.submit(owner: "A") {
            firstRunning.signal()
            release.wait()
            order.withLock { $0.append("A0") }
        }
        firstRunning.wait()
        for i in 1..<6 { worker.submit(owner: "A") { order.withLock { $0.append("A\(i)") } } }
        let done = DispatchSemaphore(value: 0)
        worker.submit(owner: "B") {
            order.withLock { $0.append("B") }
            done.signal()
        }
        release.signal()
        done.wait()
        while worker.backlog > 0 { usleep(1000) }
        usleep(10_000)
        let seen = order.withLock { $0 }
        #expect(seen.first == "A0")
        #expect(seen.firstIndex(of: "B") == 1, "\(seen)")
        // Each owner's own jobs stay in order.
        #expect(seen.filter { $0.hasPrefix("A") } == (0..<6).map { "A\($0)" })
    }

    @Test func ownersAlternate() {
        let worker = SerialWorker(name: "fair")
        defer { worker.stop() }
        let order = Mutex<[String]>([])
        let gate = DispatchSemaphore(value: 0)
        worker.submit(owner: "") { gate.wait() }
        for i in 0..<3 {
            worker.submit(owner: "A") { order.withLock { $0.append("A\(i)") } }
        }
        for i in 0..<3 {
            worker.submit(owner: "B") { order.withLock { $0.append("B\(i)") } }
        }
        gate.signal()
        while worker.backlog > 0 { usleep(1000) }
        usleep(10_000)
        #expect(order.withLock { $0 } == ["A0", "B0", "A1", "B1", "A2", "B2"])
    }
}
