#include "_CBenchReference.h"
