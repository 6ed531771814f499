/// The call table as JSON (`pincached --print-wire-table`, checked in as
/// `dbus/cryptoki-wire.json`): what a client in another language, such as the Python test
/// client, reads instead of writing the table again.
extension Calls {
    public static func json() -> String {
        func type(_ t: FieldType) -> String {
            switch t {
            case .ulong: return #"{"kind": "ulong"}"#
            case .bytes(let max): return #"{"kind": "bytes", "max": \#(max)}"#
            case .secret(let max): return #"{"kind": "secret", "max": \#(max)}"#
            case .string(let max): return #"{"kind": "string", "max": \#(max)}"#
            case .array(let element, let max): return #"{"kind": "array", "max": \#(max), "element": \#(type(element))}"#
            case .record(let fields): return #"{"kind": "record", "fields": \#(list(fields))}"#
            }
        }
        func list(_ fields: [Field]) -> String {
            "[" + fields.map { #"{"name": "\#($0.name)", "type": \#(type($0.type))}"# }.joined(separator: ", ") + "]"
        }
        var out = "{\n"
        out += #"  "version": \#(version),"# + "\n"
        out += #"  "magic": \#(magic),"# + "\n"
        out += #"  "header_size": \#(FrameHeader.size),"# + "\n"
        out += #"  "max_body": \#(Caps.frameBody),"# + "\n"
        out += #"  "error": \#(list(Frames.errorFields)),"# + "\n"
        out += #"  "calls": ["# + "\n"
        out += all.map { c in
            #"    {"id": \#(c.id), "name": "\#(c.name)", "slow": \#(c.slow), "request": \#(list(c.request)), "response": \#(list(c.response))}"#
        }.joined(separator: ",\n")
        out += "\n  ]\n}\n"
        return out
    }
}
