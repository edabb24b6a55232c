# cmake -P script behind the package_consumer test (arguments: see tests/package/CMakeLists.txt).
cmake_minimum_required(VERSION 3.24)

function(step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "package_consumer: ${what} failed (${result})")
  endif()
endfunction()

set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}")

set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
step("install" "${CMAKE_COMMAND}" --install "${KVTRIM_BUILD_DIR}" --prefix "${prefix}" ${config_args})

set(configure_args -S "${CONSUMER_SOURCE_DIR}" -B "${build}" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_BUILD_TYPE=${CONFIG}"
    "-DKVTRIM_EXPECT_CUDA=${EXPECT_CUDA}")
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CUDA_ROOT)
  list(APPEND configure_args "-DCUDAToolkit_ROOT=${CUDA_ROOT}")
endif()
step("configure" "${CMAKE_COMMAND}" ${configure_args})

# The package must come from the fresh prefix, not from the build tree or a registry.
file(STRINGS "${build}/CMakeCache.txt" found_dir REGEX "^kvtrim_DIR:")
string(REGEX REPLACE "^kvtrim_DIR:[A-Z]*=" "" found_dir "${found_dir}")
file(REAL_PATH "${found_dir}" found_dir)
file(REAL_PATH "${prefix}" real_prefix)
string(FIND "${found_dir}" "${real_prefix}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "package_consumer: kvtrim found in ${found_dir}, not under ${real_prefix}")
endif()

step("build" "${CMAKE_COMMAND}" --build "${build}" ${config_args})

set(exe "${build}/kvtrim_consumer")
if(NOT EXISTS "${exe}" AND CONFIG)
  set(exe "${build}/${CONFIG}/kvtrim_consumer")  # multi-config generators
endif()
step("run" "${exe}")
