from clusteracme.ctl.main import main

main()
