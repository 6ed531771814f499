import ArgumentParser
import DBusKit
import Dispatch
import SystemKit
import Glibc

/// `pincachectl`: the command-line front of pincached for people and scripts.
@main
struct Pincachectl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pincachectl",
        abstract: "Inspect and use pincached, the PIN-caching PKCS#11 token service.",
        discussion: """
            Exit codes: 0 success, 1 a call failed, 3 pincached (or the bus) is not \
            available, 4 refused by polkit or the bus policy, 64 usage error.
            """,
        version: "pincachectl \(Pincache.version)",
        subcommands: [Status.self, Tokens.self, Keys.self, Watch.self, Sign.self, Stats.self, Flush.self])

    /// `pincachectl --bus X status` as well as `pincachectl status --bus X`.
    @OptionGroup var options: GlobalOptions

    /// Runs `body`, turning a `CLIError` into its message on stderr and its exit code.
    static func guarded(_ body: () throws(CLIError) -> Void) throws(ExitCode) {
        do {
            try body()
        } catch {
            writeStderr("pincachectl: \(error.message)")
            throw ExitCode(error.status.rawValue)
        }
    }
}

extension Pincachectl {
    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show whether pincached answers, its mode, its tokens and your own cache environment.")

        @OptionGroup var local: GlobalOptions
        @ParentCommand var parent: Pincachectl
        var global: GlobalOptions { local.merged(over: parent.options) }

        func run() throws {
            try Pincachectl.guarded { () throws(CLIError) in
                let client = try Client(global)
                let manager = try client.managerProperties()
                let tokens = try client.tokens()
                let caller = try client.callerState()
                if global.json {
                    printJSON(.object([
                        "Daemon": .string(Pincache.busName),
                        "Bus": .string(global.busDescription),
                        "Manager": jsonDict(manager),
                        "Tokens": tokenJSON(tokens),
                        "Caller": jsonDict(caller),
                    ]))
                    return
                }
                let forceMask = manager["ForceLoginBeforeSignKeyUsage"]?.uint32Value ?? 0
                print("""
                    pincached \(display(manager["Version"])) on \(global.busDescription)
                    Mode:              \(manager["CachingMode"]?.boolValue == false ? "non-caching" : "PIN caching")
                    Logout after sign: \(yesNo(manager["LogoutAfterSign"]))
                    Force login mask:  0x\(String(forceMask, radix: 16))
                    Tokens:            \(tokens.count)
                    """)
                if !tokens.isEmpty { print("\n" + tokenTable(tokens, legend: !global.noLegend)) }
                let name: (DBusValue?) -> String = { value in
                    let paths = value?.arrayValues?.compactMap(\.objectPathValue) ?? []
                    return paths.isEmpty ? "none" : paths.map { p in
                        tokens.first { $0.path == p }.map { "\($0.id) (\($0.label))" } ?? p.rawValue
                    }.joined(separator: ", ")
                }
                print("""

                    Your environment (this connection, \(client.connection.uniqueName)):
                      Executable:  \(display(caller["Executable"]))
                      Mode:        \(caller["CachingMode"]?.boolValue == false ? "non-caching" : "PIN caching")
                      Sessions:    \(display(caller["Sessions"]))
                      Logged in:   \(name(caller["LoggedIn"]))
                      Cached PINs: \(name(caller["Cached"]))
                      Locked:      \(name(caller["Locked"]))
                    """)
            }
        }
    }

    struct Tokens: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the tokens pincached serves.")

        @OptionGroup var local: GlobalOptions
        @ParentCommand var parent: Pincachectl
        var global: GlobalOptions { local.merged(over: parent.options) }

        func run() throws {
            try Pincachectl.guarded { () throws(CLIError) in
                let tokens = try Client(global).tokens()
                if global.json {
                    printJSON(tokenJSON(tokens))
                } else if tokens.isEmpty {
                    if !global.noLegend { print("no tokens") }
                } else {
                    print(tokenTable(tokens, legend: !global.noLegend))
                }
            }
        }
    }

    struct Keys: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the private keys of a token.")

        @OptionGroup var local: GlobalOptions
        @ParentCommand var parent: Pincachectl
        var global: GlobalOptions { local.merged(over: parent.options) }

        @Argument(help: ArgumentHelp(
            "Object path, id (the part after /org/pincache/token/), label or pkcs11: URI of the token; a URI's id= or object= selects keys.",
            valueName: "token"))
        var token: String

        func run() throws {
            try Pincachectl.guarded { () throws(CLIError) in
                let client = try Client(global)
                let info = try client.resolveToken(token)
                var keys = try client.keys(of: info)
                if PKCS11URI.looksLikeOne(token) {
                    let uri = try PKCS11URI(parsing: token)
                    keys = keys.filter(uri.matches(key:))
                }
                if global.json {
                    printJSON(keyJSON(keys, on: info))
                } else if keys.isEmpty {
                    if !global.noLegend { print("no keys on \(info.id) (\(info.label))") }
                } else {
                    print(keyTable(keys, legend: !global.noLegend))
                }
            }
        }
    }

    struct Watch: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print token insertions, removals and property changes (Present, LockedBy, PinTriesLeft, ...) as they happen, until Ctrl-C.")

        @OptionGroup var local: GlobalOptions
        @ParentCommand var parent: Pincachectl
        var global: GlobalOptions { local.merged(over: parent.options) }

        func run() throws {
            try Pincachectl.guarded { () throws(CLIError) in
                let client = try Client(global)
                let json = global.json
                let emit: @Sendable (String, String, [String: JSON]) -> Void = { event, text, fields in
                    if json {
                        var object = fields
                        object["Event"] = .string(event)
                        printJSON(.object(object), pretty: false)
                    } else {
                        print("\(localTime())  \(text)")
                    }
                    // Flushed per event, so a reader at the end of a pipe sees each one at once.
                    fflush(nil)
                }
                client.connection.startLoopThread()
                do throws(DBusKit.DBusError) {
                    for member in ["TokenInserted", "TokenRemoved"] {
                        try client.connection.addSignalHandler(sender: Pincache.busName, path: Pincache.managerPath,
                                                               interface: Pincache.manager, member: member) { signal in
                            let path = signal.arguments.first?.objectPathValue?.rawValue ?? "?"
                            emit(member, "\(member) \(path)", ["Token": .string(path)])
                        }
                    }
                    // Sent to the caller whose login ended: with --bus of a connection that holds
                    // logins (a test bus, a monitor) every one shows; a plain watch sees its own.
                    try client.connection.addSignalHandler(sender: Pincache.busName, path: Pincache.managerPath,
                                                           interface: Pincache.manager, member: "CacheCleared") { signal in
                        let token = signal.arguments.first?.objectPathValue?.rawValue ?? "?"
                        let reason = signal.arguments.dropFirst().first?.stringValue ?? "?"
                        emit("CacheCleared", "CacheCleared \(token) \(reason)", ["Token": .string(token), "Reason": .string(reason)])
                    }
                    try client.connection.addSignalHandler(sender: Pincache.busName, interface: Pincache.properties,
                                                           member: "PropertiesChanged") { signal in
                        guard signal.path.rawValue.hasPrefix(Pincache.tokenPrefix), signal.arguments.count >= 2,
                              let changed = signal.arguments[1].vardictValue else { return }
                        let invalidated = signal.arguments.count > 2
                            ? (signal.arguments[2].arrayValues?.compactMap(\.stringValue) ?? []) : []
                        let pairs = changed.sorted { $0.key < $1.key }.map { "\($0.key)=\(display($0.value))" }
                        emit("PropertiesChanged",
                             "PropertiesChanged \(signal.path.rawValue) \((pairs + invalidated).joined(separator: " "))",
                             ["Token": .string(signal.path.rawValue), "Interface": .string(signal.arguments[0].stringValue ?? ""),
                              "Changed": jsonDict(changed), "Invalidated": .array(invalidated.map { .string($0) })])
                    }
                    // The daemon stopping or being (re)started explains a burst of removals/insertions.
                    try client.connection.addSignalHandler(sender: "org.freedesktop.DBus", interface: "org.freedesktop.DBus",
                                                           member: "NameOwnerChanged") { signal in
                        guard signal.arguments.count == 3, signal.arguments[0].stringValue == Pincache.busName else { return }
                        let owner = signal.arguments[2].stringValue ?? ""
                        emit(owner.isEmpty ? "DaemonStopped" : "DaemonStarted",
                             owner.isEmpty ? "pincached left the bus" : "pincached is on the bus as \(owner)",
                             ["Owner": .string(owner)])
                    }
                } catch {
                    throw CLIError(error, doing: "subscribing to signals")
                }
                client.connection.onDisconnected {
                    writeStderr("pincachectl: the bus connection was lost")
                    Glibc.exit(ExitStatus.daemonAbsent.rawValue)
                }
                if !json && !global.noLegend {
                    writeStderr("watching \(Pincache.busName) on \(global.busDescription); Ctrl-C to stop")
                }
                // Ctrl-C is the normal way out: exit 0, not the shell's 130.
                signal(SIGINT, SIG_IGN)
                let interrupt = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
                interrupt.setEventHandler { Glibc.exit(0) }
                interrupt.resume()
                while true { pause() }
            }
        }
    }

    struct Sign: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Sign data once with a key (Token1.SignOnce: the PIN is used for this call only, never cached).",
            discussion: """
                The PIN is read from the terminal without echo, or as one line from standard input \
                with --pin-stdin; never from the command line. Without --out the signature goes to \
                standard output: raw bytes, or hex when standard output is a terminal, or a JSON \
                object with the hex signature with --json.
                """)

        @OptionGroup var local: GlobalOptions
        @ParentCommand var parent: Pincachectl
        var global: GlobalOptions { local.merged(over: parent.options) }

        @Argument(help: ArgumentHelp(
            "Object path, id, label or pkcs11: URI of the token; a URI with id= or object= also names the key.",
            valueName: "token"))
        var token: String

        @Argument(help: ArgumentHelp("Key id (CKA_ID) in hex, as `keys` shows it; optional when TOKEN is a key's URI.",
                                     valueName: "key-id-hex"))
        var keyID: String?

        @Option(name: .long, help: "Mechanism name, e.g. ECDSA, ECDSA-SHA256, SHA256-RSA-PKCS, RSA-PSS-SHA256.")
        var mechanism: String

        @Option(name: .customLong("in"), help: ArgumentHelp("Data to sign; - for standard input.", valueName: "file"))
        var input = "-"

        @Option(name: .customLong("out"), help: ArgumentHelp("Where to write the signature.", valueName: "file"))
        var output: String?

        @Flag(name: .long, help: "Read the PIN as one line from standard input instead of the terminal.")
        var pinStdin = false

        func validate() throws {
            if let keyID, parseHex(keyID) == nil { throw ValidationError("'\(keyID)' is not a hex key id") }
            if keyID == nil && !PKCS11URI.looksLikeOne(token) {
                throw ValidationError("give the key id, or a pkcs11: URI with id= or object= as TOKEN")
            }
            if pinStdin && input == "-" {
                throw ValidationError("--pin-stdin takes standard input: give the data with --in FILE")
            }
        }

        func run() throws {
            try Pincachectl.guarded { () throws(CLIError) in
                let data: [UInt8]
                do {
                    data = input == "-" ? try readAll(STDIN_FILENO) : try readFile(input)
                } catch {
                    throw CLIError(.failure, "cannot read \(input): \(error)")
                }
                let client = try Client(global)
                let info = try client.resolveToken(token)
                let id = try keyID(on: info, client: client)
                let pin: PINBuffer
                do throws(PINError) {
                    pin = pinStdin ? try readPINFromStdin()
                        : try readPINFromTerminal(prompt: "PIN for \(info.label.isEmpty ? info.id : info.label): ")
                } catch {
                    throw CLIError(error == .noTerminal ? .usage : .failure, error.message)
                }
                let signature = try withExtendedLifetime(pin) { () throws(CLIError) -> [UInt8] in
                    defer { pin.wipe() }
                    // Long enough for a polkit agent's prompt and a slow card.
                    return try interactiveCall(
                        bus: global.busAddress, busDescription: global.busDescription, path: info.path.rawValue,
                        interface: Pincache.token, member: "SignOnce", timeoutMilliseconds: 120_000,
                        askPassword: !global.noAskPassword) { iter in
                            appendCString(iter, pin.pointer) && appendBytes(iter, id)
                                && appendString(iter, mechanism) && appendBytes(iter, data)
                        }
                }
                try writeSignature(signature, keyID: id)
            }
        }

        /// The key: KEY-ID, else the URI's id= (or its object= label, which must name one key).
        private func keyID(on info: TokenInfo, client: Client) throws(CLIError) -> [UInt8] {
            guard PKCS11URI.looksLikeOne(token) else { return parseHex(keyID ?? "") ?? [] }
            let uri = try PKCS11URI(parsing: token)
            if let keyID {
                let given = parseHex(keyID) ?? []
                if let fromURI = uri.keyID, fromURI != given {
                    throw CLIError(.usage, "the key id \(keyID) and the URI's id= name different keys")
                }
                return given
            }
            guard uri.namesAKey else { throw CLIError(.usage, "\(token) names no key: add id= or object=, or give the key id") }
            if let id = uri.keyID, uri.objectLabel == nil { return id }
            let keys = try client.keys(of: info).filter(uri.matches(key:))
            guard keys.count == 1, let id = keys[0]["Id"]?.bytesValue else {
                throw CLIError(keys.isEmpty ? .failure : .usage,
                               keys.isEmpty ? "no private key matches \(token)" : "\(token) matches \(keys.count) keys: add id=")
            }
            return id
        }

        private func writeSignature(_ signature: [UInt8], keyID: [UInt8]) throws(CLIError) {
            if let output {
                let fd = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                guard fd >= 0 else { throw CLIError(.failure, "cannot write \(output): \(String(cString: strerror(errno)))") }
                defer { close(fd) }
                let written = signature.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                guard written == signature.count else { throw CLIError(.failure, "cannot write \(output)") }
            } else if global.json {
                printJSON(.object(["Signature": .string(hex(signature)), "Mechanism": .string(mechanism), "KeyId": .string(hex(keyID))]))
            } else if isatty(STDOUT_FILENO) != 0 {
                print(hex(signature))
            } else {
                writeAll(STDOUT_FILENO, signature)
            }
        }
    }

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show pincached's figures (Manager1.GetStatistics): yours, or the daemon's for root and admins.")

        @OptionGroup var local: GlobalOptions
        @ParentCommand var parent: Pincachectl
        var global: GlobalOptions { local.merged(over: parent.options) }

        func run() throws {
            try Pincachectl.guarded { () throws(CLIError) in
                let reply = try Client(global).call(Pincache.managerPath, Pincache.manager, "GetStatistics")
                guard let stats = reply.first?.vardictValue else { throw CLIError(.failure, "malformed GetStatistics reply") }
                if global.json {
                    printJSON(jsonDict(stats))
                    return
                }
                let width = stats.keys.map(\.count).max() ?? 0
                for key in stats.keys.sorted() {
                    let name = padded(key, width)
                    var value = stats[key]!
                    if case .variant(let inner) = value { value = inner }
                    if case .dictionary(_, _, let entries) = value {
                        print(name + "  " + (entries.isEmpty ? "none" : ""))
                        for e in entries { print("  \(display(e.key))  \(display(e.value))") }
                    } else {
                        print(name + "  " + display(value))
                    }
                }
            }
        }
    }

    struct Flush: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Wipe every cached PIN in every environment (FlushCaches; needs org.pincache.manage).")

        @OptionGroup var local: GlobalOptions
        @ParentCommand var parent: Pincachectl
        var global: GlobalOptions { local.merged(over: parent.options) }

        func run() throws {
            try Pincachectl.guarded { () throws(CLIError) in
                // auth_admin_keep: polkit may ask for an administrator password, so allow
                // interactive authorisation and wait for a person to type it.
                _ = try interactiveCall(bus: global.busAddress, busDescription: global.busDescription,
                                        path: Pincache.managerPath.rawValue, interface: Pincache.manager,
                                        member: "FlushCaches", timeoutMilliseconds: 300_000,
                                        askPassword: !global.noAskPassword) { _ in true }
                if global.json {
                    printJSON(.object(["Flushed": .bool(true)]))
                } else {
                    print("all cached PINs wiped")
                }
            }
        }
    }
}

/// The local time of day with its UTC offset, as `watch` stamps events ("14:03:27+01:00").
func localTime() -> String {
    var now = time(nil)
    var parts = tm()
    localtime_r(&now, &parts)
    var buffer = [CChar](repeating: 0, count: 32)
    let n = strftime(&buffer, buffer.count, "%H:%M:%S%z", &parts)
    var text = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    // strftime's %z is +0100; ISO 8601 extended form wants +01:00.
    if text.count >= 5 { text.insert(":", at: text.index(text.endIndex, offsetBy: -2)) }
    return text
}
