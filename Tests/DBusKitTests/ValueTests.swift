import Testing
@testable import DBusKit

@Suite struct ObjectPathTests {
    @Test(arguments: ["/", "/a", "/org/pincache/token/1", "/A_b/9"])
    func valid(_ s: String) { #expect(ObjectPath(s)?.rawValue == s) }

    @Test(arguments: ["", "a", "//", "/a/", "/a//b", "/a-b", "/ä", "/a b"])
    func invalid(_ s: String) { #expect(ObjectPath(s) == nil) }

    @Test func appendingAndDescendants() throws {
        let org = try #require(ObjectPath.root.appending("org"))
        #expect(org.rawValue == "/org")
        let token = try #require(org.appending("pincache")?.appending("token"))
        #expect(token.rawValue == "/org/pincache/token")
        #expect(org.appending("a/b") == nil)
        #expect(org.appending("") == nil)
        #expect(token.isDescendant(of: org))
        #expect(token.isDescendant(of: .root))
        #expect(!org.isDescendant(of: org))
        #expect(!ObjectPath("/orgx")!.isDescendant(of: org))
        #expect(!ObjectPath.root.isDescendant(of: .root))
        #expect(token.parent?.rawValue == "/org/pincache")
        #expect(org.parent == .root)
        #expect(org < token)
    }
}

@Suite struct SignatureTests {
    @Test(arguments: ["", "s", "a{sv}", "aa{sv}", "(iay)", "a{oa{sa{sv}}}", "sayay", "h", "av", "a(ss)"])
    func valid(_ s: String) { #expect(DBusNames.isValidSignature(s)) }

    @Test(arguments: ["a", "()", "{sv}", "a{vs}", "a{s}", "(s", "z", "a{sv}}",
                      String(repeating: "a", count: 33) + "s", String(repeating: "(", count: 33) + "s" + String(repeating: ")", count: 33)])
    func invalid(_ s: String) { #expect(!DBusNames.isValidSignature(s)) }

    @Test func split() {
        #expect(DBusNames.splitSignature("sa{sv}(ii)ay") == ["s", "a{sv}", "(ii)", "ay"])
    }

    @Test func names() {
        #expect(DBusNames.isValidInterface("org.pincache.Manager1"))
        #expect(!DBusNames.isValidInterface("org"))
        #expect(!DBusNames.isValidInterface("org..x"))
        #expect(!DBusNames.isValidInterface("org.1x"))
        #expect(DBusNames.isValidMember("GetTokens"))
        #expect(!DBusNames.isValidMember("Get.Tokens"))
        #expect(DBusNames.isValidBusName(":1.42"))
        #expect(DBusNames.isValidBusName("org.pincache.Daemon"))
        #expect(!DBusNames.isValidBusName("org.1pincache"))
        #expect(!DBusNames.isValidBusName("nodots"))
    }
}

@Suite struct DBusValueTests {
    @Test func signatures() {
        #expect(DBusValue.vardict(["b": .uint32(1), "a": .string("x")]).signature == "a{sv}")
        #expect(DBusValue.structure([.int32(1), .bytes([]), .variant(.boolean(true))]).signature == "(iayv)")
        #expect(DBusValue.array(elementSignature: "a{sv}", []).signature == "aa{sv}")
    }

    @Test func vardictSortsAndUnwraps() throws {
        let v = DBusValue.vardict(["z": .uint32(1), "a": .string("x")])
        guard case .dictionary(_, _, let entries) = v else { Issue.record("not a dictionary"); return }
        #expect(entries.map(\.key) == [.string("a"), .string("z")])
        #expect(entries.first?.value == .variant(.string("x")))
        let d = try #require(v.vardictValue)
        #expect(d["z"]?.uint32Value == 1)
        #expect(d["a"]?.stringValue == "x")
        #expect(DBusValue.string("x").vardictValue == nil)
    }

    @Test func accessorsRejectOtherTypes() {
        #expect(DBusValue.uint32(3).stringValue == nil)
        #expect(DBusValue.int32(3).uint32Value == nil)
        #expect(DBusValue.string("x").boolValue == nil)
        #expect(DBusValue.array(elementSignature: "y", [.byte(1), .byte(2)]).bytesValue == [1, 2])
        #expect(DBusValue.bytes([1]).arrayValues == [.byte(1)])
        #expect(DBusValue.variant(.string("x")).variantValue == .string("x"))
        #expect(DBusValue.objectPath(.root).objectPathValue == .root)
    }

    @Test func marshallingProblemsAreFound() {
        #expect(DBusValue.array(elementSignature: "s", [.uint32(1)]).marshallingProblem() != nil)
        #expect(DBusValue.structure([]).marshallingProblem() != nil)
        #expect(DBusValue.string("a\u{0}b").marshallingProblem() != nil)
        #expect(DBusValue.signature("a{").marshallingProblem() != nil)
        #expect(DBusValue.dictionary(keySignature: "v", valueSignature: "s", []).marshallingProblem() != nil)
        #expect(DBusValue.vardict(["a": .string("b")]).marshallingProblem() == nil)
    }
}
