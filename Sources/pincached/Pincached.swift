import ArgumentParser
import CryptokiWire
import DBusKit
import Glibc
import PKCS11Kit
import PinPolicy
import PincacheService
import SystemKit

/// `pincached`: shares PKCS#11 tokens on D-Bus while each client connection keeps its own
/// PIN cache. Arguments are parsed by swift-argument-parser, as pincachectl's: a wrong or
/// missing value is a usage error (exit 64), never a crash.
@main
struct Pincached: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pincached",
        abstract: "Shares PKCS#11 tokens on D-Bus while each client connection keeps its own PIN cache.",
        discussion: """
            On any bus but the system bus polkit authorisation is off and the configuration's \
            ownership is not checked. Exit codes: 0 stopped by a signal (or a check passed), \
            1 cannot run (bus, modules, process hardening), 2 the configuration is refused \
            (FILE:LINE: reason), 64 usage error.
            """,
        version: "pincached \(PincacheBus.version)")

    @Option(help: ArgumentHelp("The bus to serve: system, session or a D-Bus address.", valueName: "bus"))
    var bus = "system"

    @Option(help: ArgumentHelp("The configuration file.", valueName: "file"))
    var config = "/etc/pincache/pincache.cfg"

    @Flag(help: "Debug logging (never a PIN).")
    var verbose = false

    @Flag(
        help: ArgumentHelp(
            "Check the configuration (FILE, else --config) as the daemon would start with it on --bus — ownership, syntax, that every Module= loads — and exit: 0 valid, 2 refused."))
    var checkConfig = false

    @Argument(help: ArgumentHelp("With --check-config: the file to check.", valueName: "file"))
    var file: String?

    @Option(help: ArgumentHelp("Write dbus/*.xml (the interfaces' introspection) into DIR and exit.", valueName: "dir"))
    var printIntrospection: String?

    @Flag(help: "Print the proxy's call table (dbus/cryptoki-wire.json) and exit.")
    var printWireTable = false

    func validate() throws {
        if file != nil && !checkConfig {
            throw ValidationError("a FILE argument goes with --check-config only; the daemon's file is --config")
        }
        if bus.isEmpty { throw ValidationError("--bus needs system, session or a D-Bus address") }
        if config.isEmpty { throw ValidationError("--config needs a file name") }
    }

    func run() throws {
        if printWireTable {
            print(Calls.json(), terminator: "")
            return
        }
        if let dir = printIntrospection {
            // dbus/*.xml are generated from the same declarations the daemon dispatches with.
            for iface in PincacheInterfaces.all {
                let xml = introspectionDocument(interfaces: [iface], children: [])
                do {
                    try writeFile("\(dir)/\(iface.name).xml", Array(xml.utf8))
                } catch {
                    Self.fail("cannot write \(dir)/\(iface.name).xml: \(error)", code: 1)
                }
            }
            return
        }
        Log.verbose = verbose
        Log.takeDBusKitReports()
        let onSystemBus = BusAddress(parsing: bus) == .system
        if checkConfig {
            throw ExitCode(Self.check(path: file ?? config, onSystemBus: onSystemBus))
        }
        Daemon.run(bus: bus, configPath: config, onSystemBus: onSystemBus)
    }

    static func fail(_ message: String, code: Int32) -> Never {
        writeAll(STDERR_FILENO, "pincached: \(message)\n")
        Glibc.exit(code)
    }

    /// `--check-config`: what the daemon checks before it touches a bus, then a dlopen of
    /// every module (without initialising it). Also `ExecReload=` in the unit, so a refused
    /// reload fails `systemctl reload`.
    static func check(path: String, onSystemBus: Bool) -> Int32 {
        do {
            if onSystemBus { try ConfigurationTrust.check(path: path) }
            let configuration = try Configuration.load(path: path)
            if onSystemBus { try ConfigurationTrust.check(configuration: configuration, loadedFrom: path) }
            for notice in configuration.notices { writeAll(STDERR_FILENO, "pincached: \(notice)\n") }
            for module in configuration.modules {
                do {
                    try PKCS11Module.probe(path: module)
                } catch {
                    writeAll(STDERR_FILENO, "pincached: \(path): Module=\(module): \(error)\n")
                    return 2
                }
            }
            let modules = configuration.modules.isEmpty ? p11KitRegisteredModules() : configuration.modules
            let source = configuration.modules.isEmpty ? "from p11-kit's registrations" : "from Module="
            print("\(path): valid (\(modules.count) module(s) \(source), \(configuration.applications.count) [app] section(s))")
            for module in modules { print("  module \(module)") }
            return 0
        } catch {
            // The errors name the file (and line) themselves.
            writeAll(STDERR_FILENO, "pincached: \(error)\n")
            return 2
        }
    }
}
