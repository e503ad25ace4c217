print("dedupd")
