import DBusKit
import Glibc
import PinPolicy
import PincacheService
import SystemKit

/// The daemon proper, once the arguments are parsed: hardening, the configuration's trust
/// and syntax, the bus, the modules, then the main loop until SIGTERM/SIGINT.
enum Daemon {
    static func run(bus busName: String, configPath: String, onSystemBus: Bool) -> Never {
        do {
            try ProcessHardening.disableCoreDumps()
            try ProcessHardening.wipeFreedMemory()
        } catch {
            Log.error("cannot harden the process (core dumps, crash handlers, freed memory): \(error)")
            exit(1)
        }
        // Before any thread exists: the helper that alone keeps CAP_SYS_PTRACE is forked, and
        // the daemon drops every capability.
        ExecutableHelper.startIfCapable()

        // On the system bus whoever can change the configuration or a module runs code as the daemon
        // and sees every PIN: both must be root's alone (DESIGN §5). Checked before the file is read
        // and before any bus is touched.
        if onSystemBus {
            do {
                try ConfigurationTrust.check(path: configPath)
            } catch {
                Log.stderrLine(.error, "pincached: refusing to start: \(error)")
                exit(2)
            }
        }

        let configuration: Configuration
        do {
            configuration = try Configuration.load(path: configPath)
            if onSystemBus { try ConfigurationTrust.check(configuration: configuration, loadedFrom: configPath) }
        } catch let error as TrustError {
            Log.stderrLine(.error, "pincached: refusing to start: \(error)")
            exit(2)
        } catch {
            Log.stderrLine(.error, "pincached: \(error)")
            exit(2)
        }
        for notice in configuration.notices { Log.notice(notice) }
        if !onSystemBus {
            Log.notice("not on the system bus: ownership and permissions of the configuration and Module= files are not checked")
        }

        // Signals are taken synchronously by one thread (sigwait), so no handler runs in async-signal context.
        var signals = sigset_t()
        sigemptyset(&signals)
        for s in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&signals, s) }
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        signal(SIGPIPE, SIG_IGN)

        let bus = BusAddress(parsing: busName)
        let connection: DBusConnection
        do {
            connection = try DBusConnection(bus: bus)
        } catch {
            Log.error("cannot connect to the \(busName) bus: \(error)")
            exit(1)
        }
        if bus != .system {
            Log.notice("not on the system bus: polkit authorisation is off (a bus name there is no polkit subject)")
        }

        let service = PincacheService(connection: connection, configuration: configuration, onSystemBus: bus == .system)
        let modules = configuration.modules.isEmpty ? p11KitRegisteredModules() : configuration.modules
        do {
            try service.start(modules: modules)
        } catch {
            Log.error("cannot start: \(error)")
            exit(1)
        }

        let blockedSignals = signals
        let reloadPath = configPath
        startThread(name: "pincache-signal") {
            var set = blockedSignals
            while true {
                var received: Int32 = 0
                guard sigwait(&set, &received) == 0 else { continue }
                if received == SIGHUP {
                    do {
                        if onSystemBus { try ConfigurationTrust.check(path: reloadPath) }
                        let reloaded = try Configuration.load(path: reloadPath)
                        if onSystemBus { try ConfigurationTrust.check(configuration: reloaded, loadedFrom: reloadPath) }
                        service.reload(reloaded)
                    } catch {
                        Log.error("reload refused, keeping the running configuration: \(error)", event: .reloadRefused)
                    }
                    continue
                }
                Log.info("signal \(received): shutting down", event: .stopping)
                connection.stop()
                return
            }
        }

        connection.run()
        service.shutdown()
        exit(0)
    }
}
