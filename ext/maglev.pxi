# maglev.pxi - (to be written)
