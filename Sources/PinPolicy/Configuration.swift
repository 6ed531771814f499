import Glibc

/// The caching behaviour that applies to one caller (DESIGN §1), after the defaults and its
/// executable's `[app …]` section are combined. Key names are the seed's.
public struct Settings: Sendable, Equatable {
    /// `P11_EnableCachePIN`: true = PIN caching mode, false = non-caching mode (login held, token locked).
    public var enableCachePIN: Bool = true
    /// `P11_LogoutAfterSign`: force a logout (cache wipe or release of a held login) after every signature.
    public var logoutAfterSign: Bool = false
    /// `ForceLoginBeforeSignKeyUsage`: 0 or 0x40 (non-repudiation); the parser rejects other bits.
    public var forceLoginKeyUsage: UInt32 = 0
    /// `PinCacheTimeout`: idle seconds after which a cached PIN is wiped; 0 = never.
    public var pinCacheTimeout: UInt32 = 0
    /// `PinCacheMaxUses` and `PinCacheMaxUses<KeyUsage>` (issue 15 §4): how many private-key
    /// operations a cached PIN serves before it is wiped.
    public var useLimits = UseLimits()

    /// The seed's defaults: caching on, no logout after sign, no forced login, no time-out.
    public init() {}
}

/// A problem in the configuration file that stops the daemon at startup (DESIGN §7).
public struct ConfigurationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The file as named to the parser.
    public var file: String
    /// 1-based line; 0 when the file as a whole is the problem (unreadable, not UTF-8).
    public var line: Int
    /// What is wrong, for a person.
    public var reason: String

    /// Creates an error for `file:line`.
    public init(file: String, line: Int, reason: String) {
        self.file = file
        self.line = line
        self.reason = reason
    }

    /// `FILE:LINE: reason`, the form compilers use so editors can jump to it.
    public var description: String { "\(file):\(line): \(reason)" }
}

/// The parsed `pincache.cfg` (DESIGN §7).
///
/// Syntax: `Key=Value` lines (whitespace around key and value trimmed), `#` comments (a whole
/// line, or ` # …` after a value), blank lines, `[app /absolute/path]` sections. Keys before
/// the first section are global; a section overrides the per-application keys for callers
/// whose executable is that path.
public struct Configuration: Sendable, Equatable {
    /// Settings for callers whose executable has no section.
    public var defaults: Settings
    /// Executable path → `defaults` overlaid with that section's keys.
    public var applications: [String: Settings]
    /// `Module=PATH` lines in order (global only, absolute paths). Empty = use p11-kit's registry.
    public var modules: [String]
    /// `MaxSessionsPerClient` (global only, 1...65536, default 64).
    public var maxSessionsPerClient: Int
    /// `SlotPollInterval` in ms for modules without slot events (global only, 50...600000, default 1000).
    public var slotPollIntervalMilliseconds: Int
    /// `LoginLinger` in ms (global only, 0...2000, default 50): how long a caching-mode backend
    /// login of a software token stays open, idle, for a next private operation of an
    /// environment with the same cached PIN (issue 14 §1). 0 = log out after the last queued job.
    public var loginLingerMilliseconds: Int
    /// `PinFailureFreeTries`, `PinFailureDelay`, `PinFailureMaxDelay` (global only): how fast
    /// one user may try PINs on one token (issue 12 §3).
    public var guessRule: GuessThrottle.Rule
    /// `FlushCacheOnLock`, `FlushCacheOnSuspend` (global only, default 1): logind's Lock of a
    /// desktop session ends the logins of that session's callers; PrepareForSleep ends all.
    public var flushOnLock: Bool
    public var flushOnSuspend: Bool
    /// Things worth one log line each that do not stop the daemon, as `FILE:LINE: text`.
    public var notices: [String]

    /// The configuration of an empty file.
    public init() {
        defaults = Settings()
        applications = [:]
        modules = []
        maxSessionsPerClient = 64
        slotPollIntervalMilliseconds = 1000
        loginLingerMilliseconds = 50
        guessRule = GuessThrottle.Rule()
        flushOnLock = true
        flushOnSuspend = true
        notices = []
    }

    /// Largest configuration file ``load(path:)`` reads; a bigger one is a mistake, not a config.
    public static let maximumFileSize = 1 << 20

    /// Parses configuration text; `file` is used only in errors and notices.
    /// - Throws: ``ConfigurationError`` at the first problem, naming file, line and reason.
    public static func parse(_ text: String, file: String) throws(ConfigurationError) -> Configuration {
        var parser = Parser(file: file)
        var lineNumber = 0
        // Editors on other systems like to start files with a byte-order mark.
        let text = text.hasPrefix("\u{FEFF}") ? String(text.dropFirst()) : text
        // "\r\n" is one Character in Swift, so it must be named as a separator of its own.
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }) {
            lineNumber += 1
            try parser.consume(line: rawLine, number: lineNumber)
        }
        return parser.finish()
    }

    /// Reads and parses the file at `path`.
    /// - Throws: ``ConfigurationError`` with line 0 if the file cannot be read, is too large or
    ///   is not UTF-8; otherwise as ``parse(_:file:)``.
    public static func load(path: String) throws(ConfigurationError) -> Configuration {
        let bytes = try readFile(path: path, limit: maximumFileSize)
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw ConfigurationError(file: path, line: 0, reason: "not valid UTF-8")
        }
        return try parse(text, file: path)
    }

    /// The settings for a caller whose executable is `path` (nil when unknown: the defaults).
    /// The path must match a section exactly, as `/proc/PID/exe` resolves it.
    public func settings(forExecutable path: String?) -> Settings {
        guard let path, let settings = applications[path] else { return defaults }
        return settings
    }
}

// MARK: - Parsing

/// Every key the file may hold, with where it may appear. One table drives lookup, the
/// global-only check and the Windows-only notice.
private enum Key: String, CaseIterable {
    case enableCachePIN = "P11_EnableCachePIN"
    case logoutAfterSign = "P11_LogoutAfterSign"
    case forceLoginKeyUsage = "ForceLoginBeforeSignKeyUsage"
    case pinCacheTimeout = "PinCacheTimeout"
    case pinCacheMaxUses = "PinCacheMaxUses"
    case pinCacheMaxUsesDigitalSignature = "PinCacheMaxUsesDigitalSignature"
    case pinCacheMaxUsesNonRepudiation = "PinCacheMaxUsesNonRepudiation"
    case pinCacheMaxUsesKeyEncipherment = "PinCacheMaxUsesKeyEncipherment"
    case module = "Module"
    case maxSessionsPerClient = "MaxSessionsPerClient"
    case slotPollInterval = "SlotPollInterval"
    case loginLinger = "LoginLinger"
    case pinFailureFreeTries = "PinFailureFreeTries"
    case pinFailureDelay = "PinFailureDelay"
    case pinFailureMaxDelay = "PinFailureMaxDelay"
    case flushCacheOnLock = "FlushCacheOnLock"
    case flushCacheOnSuspend = "FlushCacheOnSuspend"
    case mdEnableCachePIN = "MD_EnableCachePIN"
    case cspEnableCachePIN = "CSP_EnableCachePIN"
    case cspLogoutAfterSign = "CSP_LogoutAfterSign"

    var isGlobalOnly: Bool {
        switch self {
        case .module, .maxSessionsPerClient, .slotPollInterval, .loginLinger, .pinFailureFreeTries, .pinFailureDelay,
            .pinFailureMaxDelay, .flushCacheOnLock, .flushCacheOnSuspend:
            true
        default: false
        }
    }

    var isWindowsOnly: Bool {
        switch self {
        case .mdEnableCachePIN, .cspEnableCachePIN, .cspLogoutAfterSign: true
        default: false
        }
    }

    var isRepeatable: Bool { self == .module }

    /// The X.509 key usage bit a per-class use limit counts (CertificateKeyUsage's names).
    var keyUsageBit: UInt32? {
        switch self {
        case .pinCacheMaxUsesDigitalSignature: CertificateKeyUsage.digitalSignature
        case .pinCacheMaxUsesNonRepudiation: CertificateKeyUsage.nonRepudiation
        case .pinCacheMaxUsesKeyEncipherment: CertificateKeyUsage.keyEncipherment
        default: nil
        }
    }
}

private struct Parser {
    let file: String
    var configuration = Configuration()
    /// Section overrides are applied in `finish`, on top of the final defaults.
    var sections: [(path: String, overrides: [(Key, String, Int)])] = []
    var sectionLines: [String: Int] = [:]
    /// Keys seen in the current section (or globally), for the duplicate check.
    var seenKeys: [Key: Int] = [:]
    var noticed: Set<Key> = []

    init(file: String) { self.file = file }

    func error(_ line: Int, _ reason: String) -> ConfigurationError {
        ConfigurationError(file: file, line: line, reason: reason)
    }

    mutating func consume(line rawLine: Substring, number: Int) throws(ConfigurationError) {
        let line = trimmed(rawLine)
        if line.isEmpty || line.hasPrefix("#") { return }
        if line.hasPrefix("[") {
            try openSection(line, number: number)
            return
        }
        guard let equals = line.firstIndex(of: "=") else {
            throw error(number, "expected Key=Value, a [app /path] section or a # comment")
        }
        let name = trimmed(line[..<equals])
        let value = stripComment(line[line.index(after: equals)...])
        guard !name.isEmpty else { throw error(number, "missing key before '='") }
        guard let key = Key(rawValue: String(name)) else {
            if let match = Key.allCases.first(where: { $0.rawValue.lowercased() == name.lowercased() }) {
                throw error(number, "unknown key '\(name)' (keys are case-sensitive: did you mean '\(match.rawValue)'?)")
            }
            throw error(number, "unknown key '\(name)'")
        }
        let inSection = !sections.isEmpty
        if key.isGlobalOnly && inSection {
            throw error(number, "\(key.rawValue) is a global key: put it before the first [app …] section")
        }
        if !key.isRepeatable, let first = seenKeys[key] {
            throw error(number, "\(key.rawValue) is already set on line \(first) in this \(inSection ? "section" : "global part")")
        }
        seenKeys[key] = number
        try validate(key, value, number: number)

        if key.isWindowsOnly {
            if noticed.insert(key).inserted {
                configuration.notices.append("\(file):\(number): \(key.rawValue) is Windows-only; ignored")
            }
            return
        }
        if inSection {
            sections[sections.count - 1].overrides.append((key, value, number))
        } else {
            apply(key, value, to: &configuration.defaults)
            switch key {
            case .module: configuration.modules.append(value)
            case .maxSessionsPerClient: configuration.maxSessionsPerClient = Int(value)!
            case .slotPollInterval: configuration.slotPollIntervalMilliseconds = Int(value)!
            case .loginLinger: configuration.loginLingerMilliseconds = Int(value)!
            case .pinFailureFreeTries: configuration.guessRule.freeTries = Int(value)!
            case .pinFailureDelay: configuration.guessRule.delay = UInt64(value)! * 1_000_000
            case .pinFailureMaxDelay: configuration.guessRule.maxDelay = UInt64(value)! * 1_000_000
            case .flushCacheOnLock: configuration.flushOnLock = value == "1"
            case .flushCacheOnSuspend: configuration.flushOnSuspend = value == "1"
            default: break
            }
        }
    }

    mutating func openSection(_ line: Substring, number: Int) throws(ConfigurationError) {
        let malformed = "malformed section header '\(line)': expected [app /absolute/path/to/executable]"
        guard line.hasSuffix("]") else { throw error(number, malformed) }
        let inner = trimmed(line.dropFirst().dropLast())
        guard inner.hasPrefix("app"), let separator = inner.dropFirst(3).first, separator == " " || separator == "\t" else {
            throw error(number, malformed)
        }
        let path = String(trimmed(inner.dropFirst(3)))
        guard path.hasPrefix("/"), !path.contains("[") && !path.contains("]") else { throw error(number, malformed) }
        if let first = sectionLines[path] {
            throw error(number, "duplicate section [app \(path)] (first on line \(first))")
        }
        sectionLines[path] = number
        sections.append((path, []))
        seenKeys = [:]
    }

    func validate(_ key: Key, _ value: String, number: Int) throws(ConfigurationError) {
        func bad(_ expectation: String) -> ConfigurationError {
            error(number, "bad value '\(value)' for \(key.rawValue): \(expectation)")
        }
        switch key {
        case .enableCachePIN, .logoutAfterSign, .mdEnableCachePIN, .cspEnableCachePIN, .cspLogoutAfterSign,
            .flushCacheOnLock, .flushCacheOnSuspend:
            guard value == "0" || value == "1" else { throw bad("expected 0 or 1") }
        case .forceLoginKeyUsage:
            guard let mask = parseUnsigned(value, allowHex: true) else {
                throw bad("expected a key-usage mask such as 0x40")
            }
            let unsupported = mask & ~CertificateKeyUsage.nonRepudiation
            if unsupported != 0 {
                throw error(number, "ForceLoginBeforeSignKeyUsage=\(value) sets unsupported key-usage bits 0x\(String(unsupported, radix: 16)); only 0x40 (non-repudiation) is supported")
            }
        case .pinCacheTimeout:
            guard parseUnsigned(value, allowHex: false) != nil else { throw bad("expected seconds, 0 to 4294967295 (0 = no time-out)") }
        case .pinCacheMaxUses, .pinCacheMaxUsesDigitalSignature, .pinCacheMaxUsesNonRepudiation,
            .pinCacheMaxUsesKeyEncipherment:
            guard let n = parseUnsigned(value, allowHex: false), n <= 1_000_000 else {
                throw bad("expected a number of uses, 0 to 1000000 (0 = no limit)")
            }
        case .module:
            guard value.hasPrefix("/") else { throw bad("expected an absolute path to a PKCS#11 module") }
        case .maxSessionsPerClient:
            guard let n = parseUnsigned(value, allowHex: false), (1...65536).contains(n) else { throw bad("expected 1 to 65536") }
        case .slotPollInterval:
            guard let n = parseUnsigned(value, allowHex: false), (50...600_000).contains(n) else {
                throw bad("expected milliseconds, 50 to 600000")
            }
        case .loginLinger:
            guard let n = parseUnsigned(value, allowHex: false), n <= 2000 else {
                throw bad("expected milliseconds, 0 to 2000 (0 = no lingering login)")
            }
        case .pinFailureFreeTries:
            guard let n = parseUnsigned(value, allowHex: false), n <= 100 else { throw bad("expected 0 to 100") }
        case .pinFailureDelay, .pinFailureMaxDelay:
            guard let n = parseUnsigned(value, allowHex: false), n <= 3_600_000 else {
                throw bad("expected milliseconds, 0 to 3600000")
            }
        }
    }

    func apply(_ key: Key, _ value: String, to settings: inout Settings) {
        switch key {
        case .enableCachePIN: settings.enableCachePIN = value == "1"
        case .logoutAfterSign: settings.logoutAfterSign = value == "1"
        case .forceLoginKeyUsage: settings.forceLoginKeyUsage = parseUnsigned(value, allowHex: true)!
        case .pinCacheTimeout: settings.pinCacheTimeout = parseUnsigned(value, allowHex: false)!
        case .pinCacheMaxUses: settings.useLimits.maxUses = parseUnsigned(value, allowHex: false)!
        case .pinCacheMaxUsesDigitalSignature, .pinCacheMaxUsesNonRepudiation, .pinCacheMaxUsesKeyEncipherment:
            let n = parseUnsigned(value, allowHex: false)!
            settings.useLimits.maxUsesByKeyUsage[key.keyUsageBit!] = n == 0 ? nil : n
        default: break
        }
    }

    mutating func finish() -> Configuration {
        for section in sections {
            var settings = configuration.defaults
            for (key, value, _) in section.overrides { apply(key, value, to: &settings) }
            configuration.applications[section.path] = settings
        }
        return configuration
    }
}

/// A `#` starts a comment only at the start of the value or after whitespace, so a value may
/// still contain `#` (a path like `/opt/lib#2/x.so`).
private func stripComment(_ raw: Substring) -> String {
    var previousIsSpace = true
    for index in raw.indices {
        let character = raw[index]
        if character == "#" && previousIsSpace { return String(trimmed(raw[..<index])) }
        previousIsSpace = character == " " || character == "\t"
    }
    return String(trimmed(raw))
}

private func trimmed(_ text: Substring) -> Substring {
    let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\r" }
    guard let first = text.firstIndex(where: { !isSpace($0) }) else { return text[text.endIndex...] }
    let last = text.lastIndex(where: { !isSpace($0) })!
    return text[first...last]
}

/// Decimal digits, or `0x` + hex digits when allowed; no sign, must fit UInt32.
private func parseUnsigned(_ text: String, allowHex: Bool) -> UInt32? {
    if allowHex, text.hasPrefix("0x") || text.hasPrefix("0X") {
        let digits = text.dropFirst(2)
        guard !digits.isEmpty, digits.allSatisfy(\.isHexDigit) else { return nil }
        return UInt32(digits, radix: 16)
    }
    guard !text.isEmpty, text.allSatisfy({ $0 >= "0" && $0 <= "9" }) else { return nil }
    return UInt32(text)
}

/// Reads at most `limit` bytes of a regular file.
private func readFile(path: String, limit: Int) throws(ConfigurationError) -> [UInt8] {
    func failure(_ reason: String) -> ConfigurationError { ConfigurationError(file: path, line: 0, reason: reason) }
    func systemFailure(_ what: String) -> ConfigurationError {
        failure("cannot \(what): \(String(cString: strerror(errno)))")
    }
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw systemFailure("open") }
    defer { close(fd) }
    var info = stat()
    guard fstat(fd, &info) == 0 else { throw systemFailure("stat") }
    guard (info.st_mode & S_IFMT) == S_IFREG else { throw failure("not a regular file") }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 16384)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 {
            if errno == EINTR { continue }
            throw systemFailure("read")
        }
        if n == 0 { break }
        bytes.append(contentsOf: chunk[..<n])
        if bytes.count > limit { throw failure("larger than \(limit) bytes") }
    }
    return bytes
}
