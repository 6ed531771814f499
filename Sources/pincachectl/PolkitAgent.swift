import Glibc
import SystemKit

/// polkit's text agent for this process while a call that may need a password runs, as
/// systemctl starts one: `pkttyagent --notify-fd N --fallback` registers for its parent (this
/// process), closes N once registered, and asks on the terminal when polkit wants an
/// administrator's password (FlushCaches: auth_admin_keep). Only with a terminal on standard
/// input, and not with --no-ask-password; without pkttyagent the call goes without an agent.
///
/// `--fallback` (a desktop's own agent keeps the job) only inside a logind session: polkitd
/// (0.105–123) consults a fallback agent only after finding the caller's session, so outside
/// one (ssh without pam_systemd, a container, cron) a fallback agent would never be asked.
final class PolkitAgent {
    private var pid: pid_t = 0

    static let candidates = ["/usr/bin/pkttyagent", "/bin/pkttyagent"]

    static func start(askPassword: Bool) -> PolkitAgent? {
        guard askPassword, isatty(STDIN_FILENO) != 0,
            let path = candidates.first(where: { access($0, X_OK) == 0 })
        else { return nil }
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { return nil }
        defer { close(fds[0]) }
        let agent = PolkitAgent()
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addclose(&actions, fds[0])
        let arguments = [path, "--notify-fd", String(fds[1])] + (inLoginSession() ? ["--fallback"] : [])
        var argv = arguments.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        let spawned = posix_spawn(&agent.pid, path, &actions, nil, &argv, environ)
        close(fds[1])
        guard spawned == 0 else { return nil }
        // Registered when the agent closes its end; give up waiting after 10 s (a hung
        // polkitd), and go on: the call then fails as it would without an agent.
        var pending = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
        if poll(&pending, 1, 10_000) > 0 {
            var byte: UInt8 = 0
            _ = read(fds[0], &byte, 1)
        }
        return agent
    }

    /// Whether this process sits in a logind session: systemd gives each session a
    /// `session-N.scope` cgroup (what sd_pid_get_session reads).
    static func inLoginSession() -> Bool {
        guard let cgroup = try? readFile("/proc/self/cgroup") else { return false }
        return String(decoding: cgroup, as: UTF8.self).split(separator: "\n").contains {
            $0.contains("/session-") && $0.hasSuffix(".scope")
        }
    }

    func stop() {
        guard pid > 0 else { return }
        kill(pid, SIGTERM)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        pid = 0
    }

    deinit { stop() }
}
