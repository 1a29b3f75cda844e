#include "_CFaultEngine.h"
