# packet.pxi - (to be written)
