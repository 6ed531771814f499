import Foundation

/// A dedicated OS thread running jobs in FIFO order. PKCS#11 and PC/SC calls block for as long as
/// a card takes, so they run here and never on Swift's cooperative pool (2 threads on these
/// machines); one worker per token keeps a slow card from stalling the bus or other tokens.
final class SerialWorker: @unchecked Sendable {
    private let condition = NSCondition()
    private var jobs: [@Sendable () -> Void] = []
    private var head = 0
    private var stopping = false
    private var thread: Thread?

    init(name: String) {
        // The thread keeps the worker alive until stop() lets it finish.
        let thread = Thread { self.loop() }
        thread.name = name
        self.thread = thread
        thread.start()
    }

    func submit(_ job: @escaping @Sendable () -> Void) {
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Number of jobs not yet started (statistics, tests).
    var backlog: Int {
        condition.lock()
        defer { condition.unlock() }
        return jobs.count - head
    }

    /// Lets queued jobs finish, then ends the thread.
    func stop() {
        condition.lock()
        stopping = true
        condition.signal()
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            while head == jobs.count && !stopping { condition.wait() }
            if head == jobs.count {
                condition.unlock()
                return
            }
            let job = jobs[head]
            // A finished job must not stay reachable from the queue: its closure holds what it
            // captured (a SecretPIN, a MethodCall) until released, and a PIN must be wiped as
            // soon as its last real user is done with it, not 64 jobs later.
            jobs[head] = {}
            head += 1
            if head > 64 && head * 2 > jobs.count {
                jobs.removeFirst(head)
                head = 0
            }
            condition.unlock()
            job()
        }
    }
}
