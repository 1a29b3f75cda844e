// _CBenchReference
