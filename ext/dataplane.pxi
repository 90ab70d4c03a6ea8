# dataplane.pxi - (to be written)
