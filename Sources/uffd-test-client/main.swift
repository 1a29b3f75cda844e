print("uffd-test-client")
