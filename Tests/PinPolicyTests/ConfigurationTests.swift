import Foundation
import Testing
@testable import PinPolicy

@Suite struct ConfigurationTests {
    @Test func emptyFileGivesTheSeedDefaults() throws {
        let configuration = try Configuration.parse("", file: "empty.cfg")
        #expect(configuration == Configuration())
        #expect(configuration.defaults.enableCachePIN)
        #expect(!configuration.defaults.logoutAfterSign)
        #expect(configuration.defaults.forceLoginKeyUsage == 0)
        #expect(configuration.defaults.pinCacheTimeout == 0)
        #expect(configuration.modules.isEmpty)
        #expect(configuration.maxSessionsPerClient == 64)
        #expect(configuration.slotPollIntervalMilliseconds == 1000)
        #expect(configuration.loginLingerMilliseconds == 50)
        #expect(configuration.notices.isEmpty)
        #expect(configuration.settings(forExecutable: "/usr/bin/anything") == Settings())
        #expect(configuration.settings(forExecutable: nil) == Settings())
    }

    @Test func everyGlobalKey() throws {
        let text = """
            # pincache sample
              P11_EnableCachePIN = 0
            P11_LogoutAfterSign=1   # force logout
            ForceLoginBeforeSignKeyUsage=0x40
            PinCacheTimeout=300
            Module=/usr/lib/softhsm/libsofthsm2.so
            Module = /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so
            MaxSessionsPerClient=8
            SlotPollInterval=250\r
            LoginLinger=20

            """
        let configuration = try Configuration.parse(text, file: "pincache.cfg")
        var expected = Settings()
        expected.enableCachePIN = false
        expected.logoutAfterSign = true
        expected.forceLoginKeyUsage = 0x40
        expected.pinCacheTimeout = 300
        #expect(configuration.defaults == expected)
        #expect(configuration.modules == ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"])
        #expect(configuration.maxSessionsPerClient == 8)
        #expect(configuration.slotPollIntervalMilliseconds == 250)
        #expect(configuration.loginLingerMilliseconds == 20)
        #expect(configuration.applications.isEmpty)
        #expect(configuration.notices.isEmpty)
    }

    @Test(arguments: [("0x40", UInt32(0x40)), ("64", 0x40), ("0", 0), ("0X40", 0x40), ("0x0", 0)])
    func forceLoginAcceptedSpellings(value: String, mask: UInt32) throws {
        let configuration = try Configuration.parse("ForceLoginBeforeSignKeyUsage=\(value)", file: "f.cfg")
        #expect(configuration.defaults.forceLoginKeyUsage == mask)
    }

    @Test func rangesAtTheirLimits() throws {
        let low = try Configuration.parse(
            "MaxSessionsPerClient=1\nSlotPollInterval=50\nPinCacheTimeout=0\nLoginLinger=0", file: "l.cfg")
        #expect(low.maxSessionsPerClient == 1 && low.slotPollIntervalMilliseconds == 50)
        #expect(low.loginLingerMilliseconds == 0)
        let high = try Configuration.parse(
            "MaxSessionsPerClient=65536\nSlotPollInterval=600000\nPinCacheTimeout=4294967295\nLoginLinger=2000", file: "h.cfg")
        #expect(high.maxSessionsPerClient == 65536 && high.slotPollIntervalMilliseconds == 600_000)
        #expect(high.loginLingerMilliseconds == 2000)
        #expect(high.defaults.pinCacheTimeout == UInt32.max)
    }

    @Test func pinFailureKeys() throws {
        #expect(Configuration().guessRule == GuessThrottle.Rule(freeTries: 3, delay: 1_000_000_000, maxDelay: 30_000_000_000))
        let c = try Configuration.parse("PinFailureFreeTries=5\nPinFailureDelay=250\nPinFailureMaxDelay=2000", file: "p.cfg")
        #expect(c.guessRule == GuessThrottle.Rule(freeTries: 5, delay: 250_000_000, maxDelay: 2_000_000_000))
        let off = try Configuration.parse("PinFailureDelay=0", file: "p.cfg")
        #expect(off.guessRule.wait(after: 100) == 0)
        for bad in ["PinFailureFreeTries=101", "PinFailureDelay=-1", "PinFailureMaxDelay=3600001", "PinFailureDelay=1s"] {
            #expect(throws: ConfigurationError.self) { try Configuration.parse(bad, file: "p.cfg") }
        }
        #expect(throws: ConfigurationError.self) { try Configuration.parse("[app /bin/x]\nPinFailureDelay=5", file: "p.cfg") }
    }

    @Test func applicationSectionsOverlayTheDefaults() throws {
        let text = """
            P11_LogoutAfterSign=1
            PinCacheTimeout=60

            [app /usr/bin/evolution]
            P11_EnableCachePIN=0

            [ app   /opt/My App/bin/signer ]
            ForceLoginBeforeSignKeyUsage=64
            P11_LogoutAfterSign=0
            PinCacheTimeout=5
            [app /usr/bin/empty]
            """
        let configuration = try Configuration.parse(text, file: "apps.cfg")
        var defaults = Settings()
        defaults.logoutAfterSign = true
        defaults.pinCacheTimeout = 60
        #expect(configuration.defaults == defaults)

        var evolution = defaults
        evolution.enableCachePIN = false
        #expect(configuration.applications["/usr/bin/evolution"] == evolution)
        #expect(configuration.settings(forExecutable: "/usr/bin/evolution") == evolution)

        var signer = defaults
        signer.forceLoginKeyUsage = 0x40
        signer.logoutAfterSign = false
        signer.pinCacheTimeout = 5
        #expect(configuration.settings(forExecutable: "/opt/My App/bin/signer") == signer)
        #expect(configuration.settings(forExecutable: "/usr/bin/empty") == defaults)
        #expect(configuration.settings(forExecutable: "/usr/bin/evolution2") == defaults)
        #expect(configuration.settings(forExecutable: "/usr/bin/") == defaults)
        #expect(configuration.applications.count == 3)
    }

    @Test func commentsAndHashesInValues() throws {
        let text = """
            #P11_EnableCachePIN=0
               # indented comment
            Module=/opt/lib#2/pkcs11.so # the second build
            P11_LogoutAfterSign= 1#not a comment start
            """
        #expect(throws: ConfigurationError(file: "c.cfg", line: 4, reason: "bad value '1#not a comment start' for P11_LogoutAfterSign: expected 0 or 1")) {
            try Configuration.parse(text, file: "c.cfg")
        }
        let fine = try Configuration.parse(text.split(separator: "\n").dropLast().joined(separator: "\n"), file: "c.cfg")
        #expect(fine.modules == ["/opt/lib#2/pkcs11.so"])
        #expect(fine.defaults.enableCachePIN)
        let emptyValue = try? Configuration.parse("P11_EnableCachePIN= # nothing", file: "e.cfg")
        #expect(emptyValue == nil)
    }

    @Test func windowsLineEndings() throws {
        let configuration = try Configuration.parse("P11_EnableCachePIN=0\r\n\r\nP11_LogoutAfterSign=1\r\n", file: "crlf.cfg")
        #expect(!configuration.defaults.enableCachePIN)
        #expect(configuration.defaults.logoutAfterSign)
        let bom = try Configuration.parse("\u{FEFF}P11_EnableCachePIN=0\n", file: "bom.cfg")
        #expect(!bom.defaults.enableCachePIN)
        #expect(throws: ConfigurationError(file: "crlf.cfg", line: 3, reason: "unknown key 'X'")) {
            try Configuration.parse("P11_EnableCachePIN=0\r\n\r\nX=1\r\n", file: "crlf.cfg")
        }
    }

    @Test func windowsOnlyKeysAreAcceptedWithOneNoticeEach() throws {
        let text = """
            MD_EnableCachePIN=1
            CSP_EnableCachePIN=0
            CSP_LogoutAfterSign=1
            [app /usr/bin/a]
            MD_EnableCachePIN=0
            CSP_LogoutAfterSign=0
            """
        let configuration = try Configuration.parse(text, file: "pincache.cfg")
        #expect(configuration.notices == [
            "pincache.cfg:1: MD_EnableCachePIN is Windows-only; ignored",
            "pincache.cfg:2: CSP_EnableCachePIN is Windows-only; ignored",
            "pincache.cfg:3: CSP_LogoutAfterSign is Windows-only; ignored",
        ])
        #expect(configuration.defaults == Settings())
        #expect(configuration.settings(forExecutable: "/usr/bin/a") == Settings())
    }

    static let errorCases: [(text: String, line: Int, reason: String)] = [
        ("\n\nFoo=1", 3, "unknown key 'Foo'"),
        ("p11_enablecachepin=1", 1, "unknown key 'p11_enablecachepin' (keys are case-sensitive: did you mean 'P11_EnableCachePIN'?)"),
        ("=1", 1, "missing key before '='"),
        ("P11_EnableCachePIN", 1, "expected Key=Value, a [app /path] section or a # comment"),
        ("# ok\nthis is not a setting", 2, "expected Key=Value, a [app /path] section or a # comment"),
        ("P11_EnableCachePIN=yes", 1, "bad value 'yes' for P11_EnableCachePIN: expected 0 or 1"),
        ("P11_EnableCachePIN=", 1, "bad value '' for P11_EnableCachePIN: expected 0 or 1"),
        ("P11_LogoutAfterSign=2", 1, "bad value '2' for P11_LogoutAfterSign: expected 0 or 1"),
        ("P11_LogoutAfterSign=true", 1, "bad value 'true' for P11_LogoutAfterSign: expected 0 or 1"),
        ("MD_EnableCachePIN=on", 1, "bad value 'on' for MD_EnableCachePIN: expected 0 or 1"),
        ("CSP_EnableCachePIN=01", 1, "bad value '01' for CSP_EnableCachePIN: expected 0 or 1"),
        ("CSP_LogoutAfterSign=-1", 1, "bad value '-1' for CSP_LogoutAfterSign: expected 0 or 1"),
        ("ForceLoginBeforeSignKeyUsage=0x80", 1,
         "ForceLoginBeforeSignKeyUsage=0x80 sets unsupported key-usage bits 0x80; only 0x40 (non-repudiation) is supported"),
        ("ForceLoginBeforeSignKeyUsage=0xC0", 1,
         "ForceLoginBeforeSignKeyUsage=0xC0 sets unsupported key-usage bits 0x80; only 0x40 (non-repudiation) is supported"),
        ("ForceLoginBeforeSignKeyUsage=65", 1,
         "ForceLoginBeforeSignKeyUsage=65 sets unsupported key-usage bits 0x1; only 0x40 (non-repudiation) is supported"),
        ("ForceLoginBeforeSignKeyUsage=0x8040", 1,
         "ForceLoginBeforeSignKeyUsage=0x8040 sets unsupported key-usage bits 0x8000; only 0x40 (non-repudiation) is supported"),
        ("ForceLoginBeforeSignKeyUsage=nonRepudiation", 1,
         "bad value 'nonRepudiation' for ForceLoginBeforeSignKeyUsage: expected a key-usage mask such as 0x40"),
        ("ForceLoginBeforeSignKeyUsage=0x", 1,
         "bad value '0x' for ForceLoginBeforeSignKeyUsage: expected a key-usage mask such as 0x40"),
        ("ForceLoginBeforeSignKeyUsage=0x100000000", 1,
         "bad value '0x100000000' for ForceLoginBeforeSignKeyUsage: expected a key-usage mask such as 0x40"),
        ("PinCacheTimeout=-5", 1, "bad value '-5' for PinCacheTimeout: expected seconds, 0 to 4294967295 (0 = no time-out)"),
        ("PinCacheTimeout=5m", 1, "bad value '5m' for PinCacheTimeout: expected seconds, 0 to 4294967295 (0 = no time-out)"),
        ("PinCacheTimeout=4294967296", 1, "bad value '4294967296' for PinCacheTimeout: expected seconds, 0 to 4294967295 (0 = no time-out)"),
        ("Module=libsofthsm2.so", 1, "bad value 'libsofthsm2.so' for Module: expected an absolute path to a PKCS#11 module"),
        ("Module=", 1, "bad value '' for Module: expected an absolute path to a PKCS#11 module"),
        ("MaxSessionsPerClient=0", 1, "bad value '0' for MaxSessionsPerClient: expected 1 to 65536"),
        ("MaxSessionsPerClient=65537", 1, "bad value '65537' for MaxSessionsPerClient: expected 1 to 65536"),
        ("MaxSessionsPerClient=0x10", 1, "bad value '0x10' for MaxSessionsPerClient: expected 1 to 65536"),
        ("SlotPollInterval=49", 1, "bad value '49' for SlotPollInterval: expected milliseconds, 50 to 600000"),
        ("SlotPollInterval=600001", 1, "bad value '600001' for SlotPollInterval: expected milliseconds, 50 to 600000"),
        ("[app /usr/bin/a]\nModule=/x.so", 2, "Module is a global key: put it before the first [app …] section"),
        ("[app /usr/bin/a]\nMaxSessionsPerClient=4", 2, "MaxSessionsPerClient is a global key: put it before the first [app …] section"),
        ("LoginLinger=2001", 1, "bad value '2001' for LoginLinger: expected milliseconds, 0 to 2000 (0 = no lingering login)"),
        ("LoginLinger=-1", 1, "bad value '-1' for LoginLinger: expected milliseconds, 0 to 2000 (0 = no lingering login)"),
        ("[app /usr/bin/a]\nLoginLinger=10", 2, "LoginLinger is a global key: put it before the first [app …] section"),
        ("[app /usr/bin/a]\nSlotPollInterval=100", 2, "SlotPollInterval is a global key: put it before the first [app …] section"),
        ("[app /usr/bin/a]\n[app /usr/bin/b]\n[app /usr/bin/a]", 3, "duplicate section [app /usr/bin/a] (first on line 1)"),
        ("[app /usr/bin/a", 1, "malformed section header '[app /usr/bin/a': expected [app /absolute/path/to/executable]"),
        ("[app]", 1, "malformed section header '[app]': expected [app /absolute/path/to/executable]"),
        ("[app ]", 1, "malformed section header '[app ]': expected [app /absolute/path/to/executable]"),
        ("[app usr/bin/a]", 1, "malformed section header '[app usr/bin/a]': expected [app /absolute/path/to/executable]"),
        ("[app/usr/bin/a]", 1, "malformed section header '[app/usr/bin/a]': expected [app /absolute/path/to/executable]"),
        ("[application /usr/bin/a]", 1, "malformed section header '[application /usr/bin/a]': expected [app /absolute/path/to/executable]"),
        ("[global]", 1, "malformed section header '[global]': expected [app /absolute/path/to/executable]"),
        ("[app /a]b]", 1, "malformed section header '[app /a]b]': expected [app /absolute/path/to/executable]"),
        ("P11_EnableCachePIN=1\nP11_EnableCachePIN=0", 2, "P11_EnableCachePIN is already set on line 1 in this global part"),
        ("[app /a]\nPinCacheTimeout=1\n\nPinCacheTimeout=2", 4, "PinCacheTimeout is already set on line 2 in this section"),
    ]

    @Test(arguments: errorCases)
    func errorsNameFileLineAndReason(text: String, line: Int, reason: String) {
        let expected = ConfigurationError(file: "/etc/pincache/pincache.cfg", line: line, reason: reason)
        #expect(throws: expected) { try Configuration.parse(text, file: "/etc/pincache/pincache.cfg") }
        #expect(expected.description == "/etc/pincache/pincache.cfg:\(line): \(reason)")
    }

    @Test func keyMayRepeatPerSectionAndModuleRepeats() throws {
        let text = """
            PinCacheTimeout=1
            [app /a]
            PinCacheTimeout=2
            [app /b]
            PinCacheTimeout=3
            """
        let configuration = try Configuration.parse(text, file: "r.cfg")
        #expect(configuration.settings(forExecutable: "/a").pinCacheTimeout == 2)
        #expect(configuration.settings(forExecutable: "/b").pinCacheTimeout == 3)
        #expect(configuration.defaults.pinCacheTimeout == 1)
    }

    @Test func loadReadsAFile() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("pincache-cfg-\(UUID())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("pincache.cfg").path
        try "P11_EnableCachePIN=0\n[app /usr/bin/ssh]\nP11_EnableCachePIN=1\n".write(toFile: file, atomically: true, encoding: .utf8)
        let configuration = try Configuration.load(path: file)
        #expect(!configuration.defaults.enableCachePIN)
        #expect(configuration.settings(forExecutable: "/usr/bin/ssh").enableCachePIN)

        try "\nBogus=1\n".write(toFile: file, atomically: true, encoding: .utf8)
        #expect(throws: ConfigurationError(file: file, line: 2, reason: "unknown key 'Bogus'")) { try Configuration.load(path: file) }

        try Data([0x4D, 0x6F, 0xFF, 0x3D, 0x31]).write(to: URL(fileURLWithPath: file))
        #expect(throws: ConfigurationError(file: file, line: 0, reason: "not valid UTF-8")) { try Configuration.load(path: file) }

        let missing = directory.appendingPathComponent("absent.cfg").path
        #expect(throws: ConfigurationError(file: missing, line: 0, reason: "cannot open: No such file or directory")) {
            try Configuration.load(path: missing)
        }
        #expect(throws: ConfigurationError(file: directory.path, line: 0, reason: "not a regular file")) {
            try Configuration.load(path: directory.path)
        }
        try Data(repeating: 0x23, count: Configuration.maximumFileSize + 1).write(to: URL(fileURLWithPath: file))
        #expect(throws: ConfigurationError(file: file, line: 0, reason: "larger than \(Configuration.maximumFileSize) bytes")) {
            try Configuration.load(path: file)
        }
    }
}

@Suite struct UseLimitConfigurationTests {
    @Test func limitsAreReadGloballyAndPerApplication() throws {
        let c = try Configuration.parse(
            """
            PinCacheMaxUses=100
            PinCacheMaxUsesNonRepudiation=1
            [app /usr/bin/ssh]
            PinCacheMaxUses=0
            PinCacheMaxUsesDigitalSignature=5
            PinCacheMaxUsesKeyEncipherment=3
            """, file: "u.cfg")
        #expect(c.defaults.useLimits == UseLimits(maxUses: 100, maxUsesByKeyUsage: [0x40: 1]))
        #expect(c.settings(forExecutable: "/usr/bin/ssh").useLimits
            == UseLimits(maxUses: 0, maxUsesByKeyUsage: [0x40: 1, 0x80: 5, 0x20: 3]))
    }

    @Test func badLimitsNameTheLine() {
        #expect(throws: ConfigurationError(
            file: "b.cfg", line: 2,
            reason: "bad value '-1' for PinCacheMaxUses: expected a number of uses, 0 to 1000000 (0 = no limit)")
        ) { try Configuration.parse("\nPinCacheMaxUses=-1", file: "b.cfg") }
        #expect(throws: ConfigurationError.self) { try Configuration.parse("PinCacheMaxUsesNonRepudiation=1000001", file: "b.cfg") }
    }
}
