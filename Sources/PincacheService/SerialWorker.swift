import Glibc
import Dispatch
import SystemKit

/// A dedicated OS thread running jobs. PKCS#11 and PC/SC calls block for as long as a card
/// takes, so they run here and never on Swift's cooperative pool (2 threads on these
/// machines); one worker per token keeps a slow card from stalling the bus or other tokens.
///
/// Jobs are queued per owner (a caller's environment; "" for the daemon's own work), FIFO
/// within an owner and round-robin between owners (issue 12 §2): an owner whose job just ran
/// goes behind every owner that is waiting, so one client's stream of long operations (64
/// 16 MiB digests in flight) delays another client's signature by at most the one operation
/// that is running.
final class SerialWorker: @unchecked Sendable {
    // @unchecked: every field is guarded by `condition`.
    private let condition = ConditionLock()
    private var queues: [String: Queue] = [:]
    /// Owners with jobs waiting, in the order they will be served; the owner whose job is
    /// running is not in it until that job ends.
    private var ring: [String] = []
    private var ringHead = 0
    private var runningOwner: String?
    private var pending = 0
    private var stopping = false
    /// A job is executing, on the worker thread or inline (`runInline`).
    private var running = false
    /// Moving average of how long jobs take, in nanoseconds (1/8 weight to the newest).
    private var averageNanoseconds: UInt64 = 0
    private var hooks: Hooks?
    /// When `Hooks.idle` runs if no job starts before (monotonic nanoseconds).
    private var idleDeadline: UInt64?

    /// What the owner of the worker does around every job, on the thread that runs it and
    /// inside the jobs' mutual exclusion: the token uses it to end a shared backend login
    /// before any job that may not ride it (issue 14 §1).
    struct Hooks {
        /// Before a job; `shareable` is the job's owner if the job was submitted as a private
        /// operation that may join a shared login, nil for any other job.
        let beforeJob: (_ shareable: String?) -> Void
        /// After a job; whether another job is already waiting. Returns nanoseconds after
        /// which `idle` runs unless a job starts first, or nil.
        let afterJob: (_ morePending: Bool) -> UInt64?
        /// When the time afterJob asked for has passed with no job started (and before the
        /// thread ends): inside the jobs' mutual exclusion, like a job.
        let idle: () -> Void
    }

    private struct Queue {
        var jobs: [Job] = []
        var head = 0
        var isEmpty: Bool { head == jobs.count }

        mutating func pop() -> Job {
            let job = jobs[head]
            // A finished job must not stay reachable from the queue: its closure holds what it
            // captured (a SecretPIN, a MethodCall) until released, and a PIN must be wiped as
            // soon as its last real user is done with it, not 64 jobs later.
            jobs[head] = Job(run: {}, shareable: false)
            head += 1
            if head > 64 && head * 2 > jobs.count {
                jobs.removeFirst(head)
                head = 0
            }
            return job
        }
    }

    private struct Job {
        let run: @Sendable () -> Void
        let shareable: Bool
    }

    init(name: String) {
        // The thread keeps the worker alive until stop() lets it finish.
        startThread(name: name) { self.loop() }
    }

    /// Installs the hooks; call before the first job is submitted.
    func setHooks(_ hooks: Hooks) {
        condition.lock()
        self.hooks = hooks
        condition.unlock()
    }

    /// `shareable`: the job is a private operation of `owner` that may run in a backend login
    /// another environment with the same PIN opened (see Hooks).
    func submit(owner: String = "", shareable: Bool = false, _ job: @escaping @Sendable () -> Void) {
        condition.lock()
        let wasIdle = queues[owner]?.isEmpty ?? true
        queues[owner, default: Queue()].jobs.append(Job(run: job, shareable: shareable))
        pending += 1
        if wasIdle && runningOwner != owner { ring.append(owner) }
        condition.signal()
        condition.unlock()
    }

    /// Number of jobs not yet started (statistics, tests).
    var backlog: Int {
        condition.lock()
        defer { condition.unlock() }
        return pending
    }

    /// The owner of the job that runs next if that job is shareable, else nil. Called from a
    /// running job: nothing can overtake the job at the head of the ring meanwhile.
    var nextShareableOwner: String? {
        condition.lock()
        defer { condition.unlock() }
        guard ringHead < ring.count else { return nil }
        let owner = ring[ringHead]
        guard let queue = queues[owner], !queue.isEmpty, queue.jobs[queue.head].shareable else { return nil }
        return owner
    }

    /// Runs `job` on the calling thread, now, if nothing is queued or running and jobs have
    /// lately taken at most `limit` nanoseconds; otherwise returns false without running it.
    /// It excludes the worker's own jobs exactly as they exclude each other, so worker-only
    /// state stays single-threaded; it saves a peer channel's call two thread hand-offs.
    /// A slow token (a smart card) keeps its jobs on the worker, so one slow operation
    /// never holds up the calling thread's other work.
    func runInline(ifFasterThan limit: UInt64, owner: String = "", shareable: Bool = false, _ job: () -> Void) -> Bool {
        condition.lock()
        guard pending == 0, !running, !stopping, averageNanoseconds <= limit else {
            condition.unlock()
            return false
        }
        running = true
        idleDeadline = nil
        let hooks = self.hooks
        condition.unlock()
        let started = DispatchTime.now().uptimeNanoseconds
        hooks?.beforeJob(shareable ? owner : nil)
        job()
        finished(since: started, hooks)
        return true
    }

    private func finished(since started: UInt64, _ hooks: Hooks?) {
        let took = DispatchTime.now().uptimeNanoseconds &- started
        var idleAfter: UInt64?
        if let hooks {
            // Still inside the exclusion (`running`): a job submitted after this look runs
            // after the hook, and its own beforeJob decides for it.
            condition.lock()
            let more = pending != 0
            condition.unlock()
            idleAfter = hooks.afterJob(more)
        }
        condition.lock()
        running = false
        idleDeadline = idleAfter.map { monotonicNanoseconds() &+ $0 }
        // The owner that just ran goes behind everyone who waited meanwhile.
        if let owner = runningOwner {
            runningOwner = nil
            if queues[owner]?.isEmpty == false { ring.append(owner) } else { queues[owner] = nil }
        }
        averageNanoseconds = averageNanoseconds - averageNanoseconds / 8 + took / 8
        // Jobs queued meanwhile waited for this one; with none, the worker sleeps on (until the
        // idle deadline, which an inline job's end must tell it about).
        if pending != 0 || idleDeadline != nil { condition.signal() }
        condition.unlock()
    }

    /// Runs the idle hook inside the exclusion; called and returns with the lock held.
    private func runIdle() {
        idleDeadline = nil
        running = true
        let hooks = self.hooks
        condition.unlock()
        hooks?.idle()
        condition.lock()
        running = false
    }

    /// Lets queued jobs finish (and the idle hook run, if one is due), then ends the thread.
    func stop() {
        condition.lock()
        stopping = true
        condition.signal()
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            while running || pending == 0 {
                if running {
                    condition.wait()
                } else if let deadline = idleDeadline {
                    if stopping || monotonicNanoseconds() >= deadline {
                        runIdle()
                    } else {
                        condition.wait(until: deadline)
                    }
                } else if stopping {
                    // The thread's closure holds the worker; returning releases it.
                    condition.unlock()
                    return
                } else {
                    condition.wait()
                }
            }
            idleDeadline = nil
            let owner = ring[ringHead]
            ringHead += 1
            if ringHead > 64 && ringHead * 2 > ring.count {
                ring.removeFirst(ringHead)
                ringHead = 0
            }
            let job = queues[owner]!.pop()
            pending -= 1
            runningOwner = owner
            running = true
            let hooks = self.hooks
            condition.unlock()
            let started = DispatchTime.now().uptimeNanoseconds
            hooks?.beforeJob(job.shareable ? owner : nil)
            job.run()
            finished(since: started, hooks)
        }
    }
}
