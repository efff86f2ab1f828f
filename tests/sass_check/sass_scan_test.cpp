#include "sass_check/sass_scan.h"

#include <gtest/gtest.h>

namespace nibble::sass {
namespace {

// Shaped like cuobjdump -sass output of CUDA 13.0 for sm_90a (instructions from gemv_nvfp4_pipe_kernel's
// prologue, shortened).
constexpr std::string_view kListing = R"sass(
	code for sm_90a
		Function : _Z9early_onePKfPf
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                     /* 0x00000a00ff017b82 */
        /*0ab0*/               @P3 LDG.E.EF.128 R172, desc[UR4][R26.64] ;                     /* 0x000000041aac3981 */
        /*0e20*/              @!P4 LDG.E.128.CONSTANT R164, desc[UR4][R24.64] ;               /* 0x0000000418a4c981 */
        /*0e60*/                   LDG.E.128.CONSTANT R160, desc[UR4][R24.64+0x10] ;          /* 0x0000100418a0c981 */
        /*1240*/                   ACQBULK ;                                                  /* 0x000000000000782e */
        /*1260*/              @!P2 LDG.E.128.CONSTANT R132, desc[UR4][R40.64] ;               /* 0x000000042884a981 */
        /*1270*/                   EXIT ;                                                     /* 0x000000000000794d */
		..........

		Function : _Z8waits_upPKfPf
        /*0000*/                   ACQBULK ;                                                  /* 0x000000000000782e */
        /*0010*/                   LDG.E.CONSTANT R2, desc[UR4][R2.64] ;                      /* 0x0000000402027981 */
        /*0020*/                   ACQBULK ;                                                  /* 0x000000000000782e */
		Function : _Z7no_waitPKfPf
        /*0000*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;                  /* 0x0000000402047981 */
        /*0010*/                   LDG.E R6, desc[UR4][R2.64] ;                               /* 0x0000000402067981 */
)sass";

TEST(SassScan, CountsNonCoherentLoadsBeforeTheFirstWait) {
    const std::vector<FunctionScan> fns = scan_functions(kListing);
    ASSERT_EQ(fns.size(), 3u);
    EXPECT_EQ(fns[0].name, "_Z9early_onePKfPf");
    EXPECT_EQ(fns[0].waits, 1);
    EXPECT_EQ(fns[0].non_coherent_before_wait, 2);  // the .EF (streaming) load is coherent; the one after, allowed
    EXPECT_EQ(fns[1].name, "_Z8waits_upPKfPf");
    EXPECT_EQ(fns[1].waits, 2);
    EXPECT_EQ(fns[1].non_coherent_before_wait, 0);
    EXPECT_EQ(fns[2].name, "_Z7no_waitPKfPf");
    EXPECT_EQ(fns[2].waits, 0);
    EXPECT_EQ(fns[2].non_coherent_before_wait, 1);  // counted; a kernel without a wait is not held to it
}

TEST(SassScan, IgnoresTextOutsideFunctionsAndCommentsThatLookLikeOpcodes) {
    const std::vector<FunctionScan> fns = scan_functions(
        "ACQBULK\n/*0000*/ LDG.E.CONSTANT R1, [R2] ;\n"
        "\t\tFunction : f\n// LDG.E.CONSTANT in a comment\n        /*0000*/  NOP ; /* LDG.E.CONSTANT */\n");
    ASSERT_EQ(fns.size(), 1u);
    EXPECT_EQ(fns[0].name, "f");
    EXPECT_EQ(fns[0].waits, 0);
    EXPECT_EQ(fns[0].non_coherent_before_wait, 0);
}

TEST(SassScan, EmptyListingHasNoFunctions) { EXPECT_TRUE(scan_functions("").empty()); }

}  // namespace
}  // namespace nibble::sass
