# Writes OUT, a C++ source defining sw::SYMBOL (the bytes of IN) and
# sw::SYMBOL_size, so runtime data ships inside the library with no loader, no
# assembler trick and no compression library: cmake -DIN=.. -DOUT=.. -DSYMBOL=.. -P embed.cmake
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" hex_len)
math(EXPR size "${hex_len} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
get_filename_component(in_name "${IN}" NAME)
file(WRITE "${OUT}.tmp"
  "// Generated at build time from ${in_name} by embed.cmake; do not edit.\n"
  "#include <cstddef>\n"
  "namespace sw {\n"
  "extern const unsigned char ${SYMBOL}[] = {${bytes}0x00};\n"
  "extern const std::size_t ${SYMBOL}_size = ${size};\n"
  "}  // namespace sw\n")
file(RENAME "${OUT}.tmp" "${OUT}")
