from mailerd.unsubscribe.main import main

main()
