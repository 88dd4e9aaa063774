from mailerd.daemon import main

main()
