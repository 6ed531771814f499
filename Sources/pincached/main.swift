print("pincached: not built yet")
