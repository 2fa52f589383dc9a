// The instruction set the row ops were registered for (rows.cpp): "avx512", "avx2" or "base".
#pragma once

namespace exgrpo_native {
const char* cpu_isa();
const char* isa_error();  // "" or why $EXGRPO_NATIVE_ISA was refused
}  // namespace exgrpo_native
