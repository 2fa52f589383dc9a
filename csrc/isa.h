// The instruction set the row ops were registered for (rows.cpp): "avx512", "avx2" or "base".
#pragma once

// the AVX-512 and AVX2 variants need GCC's target pragma and an x86 host; elsewhere only the baseline is built
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define EXGRPO_MULTI_ISA 1
#else
#define EXGRPO_MULTI_ISA 0
#endif

namespace exgrpo_native {
const char* cpu_isa();
const char* isa_error();  // "" or why $EXGRPO_NATIVE_ISA was refused
}  // namespace exgrpo_native
