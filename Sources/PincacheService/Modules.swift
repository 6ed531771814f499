import CPKCS11
import Glibc

/// Backends when the configuration names none (DESIGN §5): the modules p11-kit's own loader
/// gives this program, so its rules hold as for any p11-kit-aware program — its configuration
/// directories with /etc over /usr/share, `enable-in`/`disable-in` matched against
/// "pincached", `priority`, relative `module:` paths in its module directory. Left out:
/// trust-policy modules (certificate anchors, no keys) and pincache's own proxy (it would call
/// this daemon; packaging/pincache.module says `disable-in: pincached` as well).
///
/// p11-kit dlopens each module to list it (never C_Initialize: the modules are loaded
/// unmanaged); the service then opens the same files by path.
public func p11KitRegisteredModules() -> [String] {
    guard let list = p11_kit_modules_load(nil, Int32(P11_KIT_MODULE_UNMANAGED)) else {
        if let message = p11_kit_message() { Log.warning("p11-kit: \(String(cString: message))") }
        return []
    }
    defer { p11_kit_modules_release(list) }
    var modules: [String] = []
    var index = 0
    while let module = list[index] {
        index += 1
        guard let raw = p11_kit_module_get_filename(module) else { continue }
        let path = String(cString: raw)
        free(raw)
        if p11_kit_module_get_flags(module) & Int32(P11_KIT_MODULE_TRUSTED) != 0 || isPincacheProxy(path) {
            continue
        }
        modules.append(path)
    }
    return modules
}
