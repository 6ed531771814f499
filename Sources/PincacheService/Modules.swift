import Foundation

/// Backends when the configuration names none (DESIGN §5): p11-kit's registered modules, minus
/// its trust module and pincache's own proxy (which would call this daemon).
public func p11KitRegisteredModules() -> [String] {
    let configDirs = ["/etc/pkcs11/modules", "/usr/share/p11-kit/modules"]
    let moduleDirs = ["/usr/lib/x86_64-linux-gnu/pkcs11", "/usr/lib/aarch64-linux-gnu/pkcs11", "/usr/lib/pkcs11"]
    var seenNames = Set<String>()
    var modules: [String] = []
    for dir in configDirs {
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
        for file in files where file.hasSuffix(".module") {
            // A file in /etc overrides the same name in /usr/share.
            guard seenNames.insert(file).inserted,
                let text = try? String(contentsOfFile: dir + "/" + file, encoding: .utf8)
            else { continue }
            var path: String?
            var enabled = true
            for raw in text.split(separator: "\n") {
                let line = raw.trimmingCharacters(in: .whitespaces)
                guard !line.hasPrefix("#"), let colon = line.firstIndex(of: ":") else { continue }
                let key = line[..<colon].trimmingCharacters(in: .whitespaces)
                let value = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
                if key == "module" { path = value }
                if key == "enable-in" || key == "disable-in" {
                    let names = value.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
                    if key == "enable-in" && !names.contains("pincached") { enabled = false }
                    if key == "disable-in" && names.contains("pincached") { enabled = false }
                }
            }
            guard enabled, var module = path else { continue }
            if !module.hasPrefix("/") {
                module = moduleDirs.map { $0 + "/" + module }.first { FileManager.default.fileExists(atPath: $0) } ?? module
            }
            if module.contains("p11-kit-trust") || isPincacheProxy(module) { continue }
            modules.append(module)
        }
    }
    return modules
}
