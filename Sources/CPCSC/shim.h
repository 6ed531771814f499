#include <PCSC/winscard.h>
#include <PCSC/pcsclite.h>
