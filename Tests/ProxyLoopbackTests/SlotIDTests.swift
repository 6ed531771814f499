import CPKCS11
import Testing

@testable import PincacheProxy

/// Issue 13 §1: the proxy's slot IDs are the backends' own, derived from the daemon's slot
/// names alone, so every process, fork and restart agrees.
@Suite struct SlotIDTests {
    typealias State = Library.State

    @Test func theBackendsIDWhenItIsUnique() {
        let names = ["m0_s1819230694", "m0_s2", "m1_s0"]
        #expect(State.derivedSlotID("m0_s1819230694", among: names) == 1_819_230_694)
        #expect(State.derivedSlotID("m1_s0", among: names) == 0)
    }

    @Test func aSharedIDStaysWithTheFirstModule() {
        let names = ["m1_s0", "m0_s0"]
        #expect(State.derivedSlotID("m0_s0", among: names) == 0)
        #expect(State.derivedSlotID("m1_s0", among: names) == CK_SLOT_ID(1) << 48)
    }

    @Test func otherNamesGetAStableHash() {
        let id = State.derivedSlotID("reader-7", among: ["reader-7"])
        #expect(id == State.derivedSlotID("reader-7", among: []) && id >> 63 == 1)
        #expect(State.parseSlotName("m0_sx") == nil && State.parseSlotName("m3_s9")! == (3, 9))
    }

    @Test func anIDIsKeptForTheLifeOfTheInstance() {
        var state = State()
        let first = state.slotID(for: "m0_s5", among: ["m0_s5"])
        #expect(state.slotID(for: "m0_s5", among: ["m0_s5", "m1_s5"]) == first)
        #expect(state.slotID(for: "m1_s5", among: ["m0_s5", "m1_s5"]) == CK_SLOT_ID(1) << 48 | 5)
    }
}
