#ifndef DEDUPD_CHIREDIS_SHIM_H
#define DEDUPD_CHIREDIS_SHIM_H
#include <hiredis/hiredis.h>
#endif
