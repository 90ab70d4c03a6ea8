# flowtable.pxi - (to be written)
