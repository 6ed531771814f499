import ArgumentParser
import DBusKit
import Glibc

/// Names on the bus, as DESIGN §2 fixes them.
enum Pincache {
    /// The same as pincached's (PincacheBus.version); the system tests compare both.
    static let version = "0.2.0"
    static let busName = "org.pincache.Daemon"
    static let managerPath = ObjectPath("/org/pincache")!
    static let tokenPrefix = "/org/pincache/token/"
    static let manager = "org.pincache.Manager1"
    static let token = "org.pincache.Token1"
    static let properties = "org.freedesktop.DBus.Properties"
    static let objectManager = "org.freedesktop.DBus.ObjectManager"
}

/// pincachectl's exit codes; scripts tell "not running" from "refused" from "failed" by them.
enum ExitStatus: Int32 {
    case ok = 0
    /// Any other D-Bus or I/O failure (a wrong PIN, an unknown key, ...).
    case failure = 1
    /// No bus, or nobody owns (or can be activated as) org.pincache.Daemon.
    case daemonAbsent = 3
    /// polkit (NotAuthorized) or the bus policy (AccessDenied) refused the call.
    case refused = 4
    /// Bad command line or unusable input (sysexits EX_USAGE, as ArgumentParser uses).
    case usage = 64
}

/// A failure to report on stderr, ending the program with its status.
struct CLIError: Error {
    var status: ExitStatus
    var message: String

    init(_ status: ExitStatus, _ message: String) {
        self.status = status
        self.message = message
    }

    /// Classifies a D-Bus error by its name so the exit code means the same for every command.
    init(_ error: DBusKit.DBusError, doing what: String) {
        let name = error.name
        let absentNames: Set<String> = [
            "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
            "org.freedesktop.DBus.Error.NoServer", "org.freedesktop.DBus.Error.FileNotFound",
            "org.freedesktop.DBus.Error.Disconnected",
        ]
        let refusedNames: Set<String> = [
            "org.pincache.Error.NotAuthorized", "org.freedesktop.DBus.Error.AccessDenied",
            "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
        ]
        let launcherFailed = name == "org.freedesktop.DBus.Error.NoMemory" && error.message.hasPrefix("Launch")
        if name.hasPrefix("org.freedesktop.DBus.Error.Spawn.") || launcherFailed {
            // Activation ran pincached and it stopped. Without systemd the bus reads its exit
            // status as dbus-daemon-launch-helper's (a refused configuration, 2, reads as
            // "Launcher could not run (out of memory)"), so say what to check instead.
            self.init(
                .daemonAbsent,
                "pincached could not be started by D-Bus activation (\(what)) [\(name)]: check its configuration with "
                    + "`pincached --check-config` and its log (`journalctl -u pincached`)")
        } else if absentNames.contains(name) {
            self.init(.daemonAbsent, "pincached is not available (\(what)): \(error.message) [\(name)]")
        } else if refusedNames.contains(name) {
            self.init(.refused, "refused (\(what)): \(error.message) [\(name)]")
        } else {
            self.init(.failure, "\(what) failed: \(error.message) [\(name)]")
        }
    }
}

/// `--bus` and `--json`, shared by every subcommand.
struct GlobalOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp(
        "system, session or a D-Bus address (default: $PINCACHE_BUS_ADDRESS, else system).",
        valueName: "bus"))
    var bus: String?

    @Flag(name: .long, help: "Print JSON instead of tables.")
    var json = false

    @Flag(name: .long, help: "Tables without their header line, hints without their legend (for scripts).")
    var noLegend = false

    @Flag(name: .long, help: "Never ask for a password: no polkit agent, and polkit is told not to prompt.")
    var noAskPassword = false

    /// A --bus that is neither a name nor a D-Bus address (`transport:key=value,…`) is a
    /// usage error, not an absent daemon.
    func validate() throws {
        guard let bus, bus != "system", bus != "session" else { return }
        let transport = bus.prefix { $0 != ":" }
        guard transport.count < bus.count, !transport.isEmpty, transport.allSatisfy({ $0.isLetter || $0 == "-" }) else {
            throw ValidationError("--bus takes system, session or a D-Bus address such as unix:path=/run/dbus/system_bus_socket, not '\(bus)'")
        }
    }

    /// These options given after the subcommand, completed by those given before it.
    func merged(over parent: GlobalOptions) -> GlobalOptions {
        var result = self
        if result.bus == nil { result.bus = parent.bus }
        result.json = json || parent.json
        result.noLegend = noLegend || parent.noLegend
        result.noAskPassword = noAskPassword || parent.noAskPassword
        return result
    }

    /// An explicit --bus wins, then the environment (as for the proxy library), then the system bus.
    var busAddress: BusAddress {
        if let bus { return BusAddress(parsing: bus) }
        if let env = getenv("PINCACHE_BUS_ADDRESS").map({ String(cString: $0) }), !env.isEmpty {
            return .address(env)
        }
        return .system
    }

    var busDescription: String {
        switch busAddress {
        case .system: "the system bus"
        case .session: "the session bus"
        case .address(let a): "the bus at \(a)"
        }
    }
}

/// A connection to pincached with typed helpers for the calls pincachectl makes.
final class Client {
    let connection: DBusConnection
    let options: GlobalOptions

    init(_ options: GlobalOptions) throws(CLIError) {
        self.options = options
        do {
            connection = try DBusConnection(bus: options.busAddress)
        } catch {
            throw CLIError(.daemonAbsent, "cannot connect to \(options.busDescription): \(error.message) [\(error.name)]")
        }
    }

    func call(_ path: ObjectPath, _ interface: String, _ member: String, _ arguments: [DBusValue] = [],
              timeoutMilliseconds: Int32 = 25_000) throws(CLIError) -> [DBusValue] {
        do {
            return try connection.callBlocking(destination: Pincache.busName, path: path, interface: interface,
                                               member: member, arguments: arguments,
                                               timeoutMilliseconds: timeoutMilliseconds)
        } catch {
            throw CLIError(error, doing: member)
        }
    }

    func managerProperties() throws(CLIError) -> [String: DBusValue] {
        let reply = try call(Pincache.managerPath, Pincache.properties, "GetAll", [.string(Pincache.manager)])
        guard let dict = reply.first?.vardictValue else { throw CLIError(.failure, "malformed GetAll reply") }
        return dict
    }

    func tokenPaths() throws(CLIError) -> [ObjectPath] {
        let reply = try call(Pincache.managerPath, Pincache.manager, "GetTokens")
        guard let paths = reply.first?.arrayValues?.compactMap(\.objectPathValue) else {
            throw CLIError(.failure, "malformed GetTokens reply")
        }
        return paths
    }

    /// Every token with its Token1 properties, in GetTokens order.
    func tokens() throws(CLIError) -> [TokenInfo] {
        let paths = try tokenPaths()
        var byPath: [ObjectPath: [String: DBusValue]] = [:]
        // One GetManagedObjects instead of a GetAll per token; GetAll covers a token that
        // appeared between the two calls.
        if let managed = try? call(Pincache.managerPath, Pincache.objectManager, "GetManagedObjects").first?
            .dictionaryEntries {
            for entry in managed {
                guard let path = entry.key.objectPathValue,
                      let interfaces = entry.value.dictionaryEntries,
                      let props = interfaces.first(where: { $0.key.stringValue == Pincache.token })?.value.vardictValue
                else { continue }
                byPath[path] = props
            }
        }
        var result: [TokenInfo] = []
        for path in paths {
            if let props = byPath[path] {
                result.append(TokenInfo(path: path, properties: props))
            } else {
                let reply = try call(path, Pincache.properties, "GetAll", [.string(Pincache.token)])
                result.append(TokenInfo(path: path, properties: reply.first?.vardictValue ?? [:]))
            }
        }
        return result
    }

    /// TOKEN as the user wrote it: an object path, the id after /org/pincache/token/, a label,
    /// or a pkcs11: URI whose token attributes name exactly one token.
    func resolveToken(_ spec: String) throws(CLIError) -> TokenInfo {
        let all = try tokens()
        if PKCS11URI.looksLikeOne(spec) {
            let uri = try PKCS11URI(parsing: spec)
            let matching = all.filter(uri.matches)
            if matching.count == 1 { return matching[0] }
            if matching.isEmpty { throw CLIError(.failure, "no token matches \(spec) (try `pincachectl tokens --json`)") }
            let paths = matching.map(\.path.rawValue).joined(separator: ", ")
            throw CLIError(.usage, "\(spec) matches \(matching.count) tokens (\(paths)): add serial= or token=")
        }
        if spec.hasPrefix("/") {
            if let t = all.first(where: { $0.path.rawValue == spec }) { return t }
            throw CLIError(.failure, "no token at \(spec)")
        }
        if let t = all.first(where: { $0.id == spec }) { return t }
        let byLabel = all.filter { $0.label == spec }
        if byLabel.count == 1 { return byLabel[0] }
        if byLabel.count > 1 {
            let paths = byLabel.map(\.path.rawValue).joined(separator: ", ")
            throw CLIError(.usage, "label '\(spec)' names \(byLabel.count) tokens (\(paths)): give the id or path")
        }
        throw CLIError(.failure, "no token '\(spec)' (try `pincachectl tokens`)")
    }

    func keys(of token: TokenInfo) throws(CLIError) -> [[String: DBusValue]] {
        let reply = try call(token.path, Pincache.token, "ListKeys")
        guard let list = reply.first?.arrayValues else { throw CLIError(.failure, "malformed ListKeys reply") }
        return list.compactMap(\.vardictValue)
    }

    func callerState() throws(CLIError) -> [String: DBusValue] {
        let reply = try call(Pincache.managerPath, Pincache.manager, "GetCallerState")
        guard let dict = reply.first?.vardictValue else { throw CLIError(.failure, "malformed GetCallerState reply") }
        return dict
    }
}

/// One token as listed by GetTokens, with its properties.
struct TokenInfo {
    var path: ObjectPath
    var properties: [String: DBusValue]

    var id: String { String(path.rawValue.dropFirst(Pincache.tokenPrefix.count)) }
    var label: String { properties["Label"]?.stringValue ?? "" }
}
